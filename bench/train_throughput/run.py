"""Training throughput: kubetune's trainer against TRL's SFTTrainer and a plain Trainer + PEFT baseline.

Every row trains the same LoRA adapter (same rank, targets, optimizer, learning rate and seed)
on the same Llama-architecture model, drawing from the same tokenized examples, with the same
number of examples per step and the same number of steps, each in its own Python process (so
its peak RSS is its own). They do not all see the examples in the same order: what differs is
how examples are put into batches, and that decides the order too:

* kubetune: ``ModelFinetuner`` with its defaults -- ``packing`` unset (auto): on CPU, and on
  GPUs without flash-attn, ``group_by_length`` batches drawn from length-sorted megabatches, so
  the padding a batch needs is small; on CUDA with flash-attn, packed rows as below;
* kubetune-packed: ``packing: true`` -- each step's examples (in random order) are concatenated
  into one padding-free row, attended one example at a time (flash-attention's variable-length
  kernel on CUDA where installed, else kubetune's ``packed_sdpa``), so no work crosses examples;
* trl-default / trl-grouped / trl-packed: TRL's ``SFTTrainer`` with a PEFT ``LoraConfig``, as
  its documentation recommends: defaults (random padded batches), length-grouped batches, and
  best-fit-decreasing packing with ``padding_free`` (see ``TRL_VARIANTS``);
* baseline: ``Trainer`` + ``peft.get_peft_model`` + ``DataCollatorForSeq2Seq(padding="longest")``
  on random batches, the textbook recipe, which pads every example to the longest of its batch.

Because the runs see different examples in the timed steps, the comparison is per real token:
throughput is real (non-padding) tokens per second, timed after ``--warmup`` steps (start-up
drops out), on wall time and per second of the process's CPU time (the check on a busy machine).

The data mimics instruction-tuning sets: response lengths follow a log-normal distribution
(median ~60 words, a long tail to ~600), so a random batch carries much padding.

Model FLOPs utilisation (MFU) follows the PaLM paper's accounting (Chowdhery et al. 2022,
"PaLM: Scaling Language Modeling with Pathways", Appendix B): training a dense decoder costs
``6·N + 12·L·H·Q·T`` FLOPs per token, with N the non-embedding parameters, L layers, H heads,
Q head dimension and T the sequence length; 6·N is the forward matmuls (2·N), the gradients
with respect to activations (2·N) and with respect to weights (2·N); 12·L·H·Q·T is the attention
score and value products (forward 4·L·H·Q·T, backward twice that), not halved for the causal
mask. For LoRA the base weights are frozen, so their weight gradients are not computed:

    FLOPs/token = 4·N + 6·N_lora + 12·L·H·Q·T_eff

N counts every parameter used in a matmul: all but the input embedding table (a lookup, no
FLOPs), the untied output projection included. N_lora is the adapter (r=16 on every linear layer
but the output head). The examples have different lengths and attention never crosses
examples, so for T the script uses T_eff = E[s²]/E[s] over the tokenized examples (an example of
s tokens costs 12·L·H·Q·s² for attention, i.e. 12·L·H·Q·s per token). Padding, the
cross-example attention of packed sdpa rows and activation recomputation are not counted:
they are not model FLOPs. Achieved TFLOPS = FLOPs/token x real tokens/s; MFU divides that by
the peak of the run's precision: ``--peak-tflops`` where given (default on CUDA: 989, H100 SXM bf16 dense); on CPU the
peak this machine measures in the same run, the best of several large square ``torch.matmul``
(sizes 1024-4096, the threads the training runs use) in bf16 and in fp32 -- what the CPU's
matmul units (AMX, AVX-512) deliver, not a datasheet figure. ``--rounds N`` runs every row N
times, interleaved (even rounds in reverse order), measuring the peak again each round: each row reports its median round and
MFU uses the best peak seen, so a machine whose speed drifts (a shared host) neither favours the
rows that ran in a fast phase nor flatters MFU with a peak measured in a slow one.

Runs use ``precision: auto`` (bf16 on GPUs and on CPUs with AMX or AVX-512 BF16); where that
is not fp32 on a CPU, every row also runs in fp32 (suffix ``-fp32``); each kubetune row is compared
with the baseline and with TRL's best row in its own precision, and kubetune's defaults with TRL's
best row of any precision.

    .venv/bin/python bench/train_throughput/run.py                      # CPU, small model
    .venv/bin/python bench/train_throughput/run.py --preset gpu-1b      # CUDA, ~1B parameters
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # hidden, layers, heads, kv heads, intermediate, vocab, batch, steps, warmup, max_len
    "cpu": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 688, "vocab": 512,
            "batch": 8, "steps": 24, "warmup": 4, "max_len": 1024, "examples": 600},
    "gpu-1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000,
               "batch": 16, "steps": 60, "warmup": 10, "max_len": 2048, "examples": 2000},
}  # fmt: skip

_WORD_TEXT = (
    "the model learns to answer questions about data training evaluation adapters layers tokens "
    "attention gradient memory cluster node storage checkpoint value result example language text"
)
_WORDS = _WORD_TEXT.split()


def make_dataset(path: Path, n: int, seed: int) -> None:
    """Instruction records with a log-normal response length (realistic spread)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = min(600, max(3, int(rng.lognormvariate(math.log(60), 0.9))))
            record = {
                "instruction": f"Question {i}: " + " ".join(rng.choices(_WORDS, k=rng.randint(5, 25))),
                "output": " ".join(rng.choices(_WORDS, k=words)),
            }
            f.write(json.dumps(record) + "\n")


LORA_R = 16


def example_lengths(model_dir: Path, data: Path, max_len: int) -> list[int]:
    """Token counts of the tokenized training examples (what every run draws from)."""
    from transformers import AutoTokenizer

    from kubetune_trainer.data import DataOptions, DataSource, prepare_datasets

    tok = AutoTokenizer.from_pretrained(model_dir)
    train = prepare_datasets(
        tok, [DataSource(str(data))], DataOptions(max_seq_length=max_len, dedupe="none", seed=0)
    ).train
    return [len(train[i]["input_ids"]) for i in range(len(train))]


def lora_flops_per_token(model: Any, lengths: list[int], lora_r: int = LORA_R) -> dict[str, float]:
    """Model FLOPs per trained token for LoRA on ``model`` (PaLM Appendix B, frozen base; module docstring).

    ``4·N + 6·N_lora + 12·L·H·Q·T_eff``: N = parameters used in matmuls (all but the input
    embedding table), N_lora = the adapter on every Linear but the output head, T_eff = E[s²]/E[s].
    """
    import torch

    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    n_total = sum(t.numel() for t in model.parameters())  # tied tensors once
    n_matmul = n_total - (0 if tied else embed.numel())
    n_lora = sum(
        lora_r * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    t_eff = sum(s * s for s in lengths) / sum(lengths)
    attention = 12 * layers * cfg.num_attention_heads * head_dim * t_eff
    return {
        "params": n_total,
        "non_embedding_params": n_matmul,
        "lora_params": n_lora,
        "t_eff": t_eff,
        "flops_per_token": 4 * n_matmul + 6 * n_lora + attention,
        "attention_flops_per_token": attention,
    }


PEAK_SIZES = (1024, 2048, 4096)


def measure_matmul_peak(dtype: Any, sizes: tuple[int, ...] = PEAK_SIZES, repeats: int = 5) -> dict[str, Any]:
    """This machine's dense matmul rate in ``dtype``: best of ``repeats`` timings per size, best size.

    ``2·n³`` FLOPs per ``n x n`` product; the calls run back to back (enough of them for ~0.2 s)
    after one untimed warm-up call, on the device the training runs use, with torch's current
    thread count (the one the training runs in this process get).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    per_size: dict[int, float] = {}
    per_size_cpu: dict[int, float] = {}  # the same from process CPU time (robust to a busy machine)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up: kernel selection, AMX tile set-up, page faults
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        calls = max(1, min(50, int(0.2 / max(time.perf_counter() - t0, 1e-6))))
        best = best_cpu = math.inf
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                torch.matmul(a, b)
            sync()
            best = min(best, (time.perf_counter() - t0) / calls)
            best_cpu = min(best_cpu, (time.process_time() - c0) / calls)
        per_size[n] = 2 * n**3 / best / 1e12
        per_size_cpu[n] = 2 * n**3 / best_cpu / 1e12 * torch.get_num_threads()
        del a, b
    size = max(per_size, key=lambda k: per_size[k])
    return {
        "tflops": per_size[size],
        "size": size,
        "per_size": per_size,
        # TFLOPS per second of CPU time, times the threads: equal to "tflops" on a quiet machine
        "tflops_cpu_time": max(per_size_cpu.values()) if device == "cpu" else None,
        "threads": torch.get_num_threads(),
    }


def _timing_callback(warmup: int):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Wall time and non-padding tokens between the end of step ``warmup`` and the end of training."""

        def __init__(self) -> None:
            self.t0 = self.cpu0 = self.tokens0 = None
            self.seconds = self.cpu_seconds = self.tokens = self.peak_rss_mib = 0.0

        def _sync(self) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == warmup:
                self._sync()
                self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                self.cpu0 = time.process_time()

        def on_train_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self._sync()
            self.seconds = time.perf_counter() - self.t0
            self.cpu_seconds = time.process_time() - self.cpu0
            # Peak resident memory of this process (its own, one configuration per process) up to
            # the end of training: model load and every step, not what a tool does afterwards
            # (kubetune draws its loss plot and writes outputs then). ru_maxrss is KiB on Linux.
            import resource

            self.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.tokens = state.num_input_tokens_seen - self.tokens0

        def result(self) -> dict[str, float]:
            return {
                "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds,
                "tokens": self.tokens,
                "peak_rss_mib": self.peak_rss_mib,
            }

    return Timing()


def _config(model_dir: Path, data: Path, out: Path, p: dict[str, Any], packing: bool | None, precision: str):
    from kubetune_trainer.config import FinetuningConfig

    return FinetuningConfig(
        model_name=str(model_dir),
        output_dir=str(out),
        train_file=str(data),
        method="lora",
        lora={"r": LORA_R, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        max_steps=p["steps"],
        per_device_train_batch_size=p["batch"],
        learning_rate=1e-4,
        max_seq_length=p["max_len"],
        packing=packing,  # None: the default, auto (the faster layout for the device)
        group_by_length=True,  # kubetune's default; ignored when packing
        dedupe="none",
        precision=precision,
        logging_steps=1000,
        save_steps=100000,
        resume="never",
        progress_bar=False,
        seed=0,
    )


def run_kubetune(
    model_dir: Path, data: Path, work: Path, p: dict[str, Any], precision: str, packing: bool | None
) -> dict[str, float]:
    from kubetune_trainer.finetuner import ModelFinetuner

    name = "kubetune-packed" if packing else "kubetune"
    ft = ModelFinetuner(_config(model_dir, data, work / name, p, packing=packing, precision=precision))
    ft.load_model()
    timing = _timing_callback(p["warmup"])
    # The same train() users call, with the timing probe added to the Trainer it builds.
    original = ft._runtime_callbacks
    ft._runtime_callbacks = lambda: [*original(), timing]  # type: ignore[method-assign]
    ft.train()
    ft.close()
    return timing.result()


def run_baseline(
    model_dir: Path, data: Path, work: Path, p: dict[str, Any], precision: str
) -> dict[str, float]:
    """Plain transformers + PEFT: pad each batch to its longest example."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from kubetune_trainer.data import DataOptions, DataSource, prepare_datasets

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    # The same tokenized examples (prompt masked) as kubetune's run: only the batching differs.
    dataset = prepare_datasets(
        tok, [DataSource(str(data))], DataOptions(max_seq_length=p["max_len"], dedupe="none", seed=0)
    ).train
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA_R,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type=TaskType.CAUSAL_LM,
        ),
    )
    args = TrainingArguments(
        output_dir=str(work / "baseline"),
        max_steps=p["steps"],
        per_device_train_batch_size=p["batch"],
        learning_rate=1e-4,
        warmup_steps=0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        data_seed=0,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
    )
    timing = _timing_callback(p["warmup"])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
        callbacks=[timing],
    )
    trainer.train()
    return timing.result()


#: TRL's SFTTrainer configurations: name suffix -> SFTConfig options beyond the shared ones.
TRL_VARIANTS: dict[str, dict[str, Any]] = {
    # SFTConfig's defaults: random batches padded to their longest, and gradient checkpointing
    # (TRL turns it on by default to save memory; it recomputes the forward pass in backward).
    "default": {},
    # The fast configurations: no recomputation (as kubetune's default; these models fit easily),
    # with transformers' LengthGroupedSampler ...
    "grouped": {"train_sampling_strategy": "group_by_length", "gradient_checkpointing": False},
    # ... or best-fit-decreasing packing into rows of max_length; TRL turns padding_free on for
    # "bfd" (one flattened row with position_ids, the layout its docs recommend for packing).
    "packed": {
        "packing": True,
        "packing_strategy": "bfd",
        "padding_free": True,
        "gradient_checkpointing": False,
    },
}


def run_trl(
    model_dir: Path, data: Path, work: Path, p: dict[str, Any], precision: str, variant: str
) -> dict[str, float]:
    timing = _timing_callback(p["warmup"])
    trl_trainer(model_dir, data, work, p, precision, variant, callbacks=[timing]).train()
    return timing.result()


def trl_trainer(
    model_dir: Path,
    data: Path,
    work: Path,
    p: dict[str, Any],
    precision: str,
    variant: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """TRL's SFTTrainer with a PEFT LoraConfig, on the same tokenized examples as kubetune.

    The dataset is handed over pre-tokenized (``input_ids`` + ``completion_mask``, a format
    SFTTrainer accepts), so TRL trains on exactly kubetune's tokens with the prompt masked out
    of the loss (``completion_only_loss=True``). Packed rows hold up to ``max_length`` tokens;
    a step takes ``packed_rows`` of them, about the tokens of ``batch`` examples.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kubetune_trainer.data import DataOptions, DataSource, prepare_datasets

    tok = AutoTokenizer.from_pretrained(model_dir)
    train = prepare_datasets(
        tok, [DataSource(str(data))], DataOptions(max_seq_length=p["max_len"], dedupe="none", seed=0)
    ).train
    rows = [train[i] for i in range(len(train))]
    dataset = Dataset.from_dict(
        {
            "input_ids": [list(r["input_ids"]) for r in rows],
            "completion_mask": [[int(label != -100) for label in r["labels"]] for r in rows],
        }
    )
    options = dict(TRL_VARIANTS[variant])
    packed = options.get("packing", False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    args = SFTConfig(
        output_dir=str(work / f"trl-{variant}-{precision}"),
        max_length=p["max_len"],
        completion_only_loss=True,
        max_steps=p["steps"],
        per_device_train_batch_size=p["packed_rows"] if packed else p["batch"],
        learning_rate=1e-4,
        warmup_steps=0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        data_seed=0,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        **options,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=LoraConfig(
            r=LORA_R,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type=TaskType.CAUSAL_LM,
        ),
        callbacks=callbacks or [],
    )


def run_row(spec: dict[str, Any]) -> dict[str, float]:
    """One configuration (in its own process, so its peak RSS is its own)."""
    model_dir, data, work, p = Path(spec["model_dir"]), Path(spec["data"]), Path(spec["work"]), spec["p"]
    kind, precision = spec["kind"], spec["precision"]
    if kind == "baseline":
        return run_baseline(model_dir, data, work, p, precision)
    if kind == "kubetune":
        return run_kubetune(model_dir, data, work, p, precision, packing=spec.get("packing"))
    return run_trl(model_dir, data, work, p, precision, spec["variant"])


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process; its result plus its peak RSS."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"configuration {spec['name']} failed (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1][len(_RESULT) :])


_RESULT = "BENCH-RESULT "


def _child_main(spec_json: str) -> int:
    result = run_row(json.loads(spec_json))
    print(_RESULT + json.dumps(result), flush=True)
    return 0


def rows_for(precision: str, cuda: bool) -> list[dict[str, Any]]:
    """Every configuration of one bench run, in order (name, kind, precision, options)."""
    precisions = [precision] + (["fp32"] if precision != "fp32" and not cuda else [])
    rows: list[dict[str, Any]] = []
    for prec in precisions:
        suffix = "" if prec == precision else f"-{prec}"
        rows += [
            {"name": f"baseline{suffix}", "kind": "baseline", "precision": prec},
            {"name": f"kubetune{suffix}", "kind": "kubetune", "precision": prec},
            {"name": f"kubetune-packed{suffix}", "kind": "kubetune", "precision": prec, "packing": True},
        ]
        rows += [
            {"name": f"trl-{v}{suffix}", "kind": "trl", "precision": prec, "variant": v} for v in TRL_VARIANTS
        ]
    return rows


def scaled_model(p: dict[str, Any], hidden: int) -> dict[str, Any]:
    """The preset with another hidden size: head dim 64 (32 below 512, like the CPU preset), 2 query
    heads per KV head, MLP 8/3·hidden."""
    heads = max(1, hidden // (64 if hidden >= 512 else 32))
    return {
        **p,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": max(1, heads // 2),
        "intermediate": -(-(hidden * 8 // 3) // 16) * 16,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: gpu-1b on CUDA, else cpu"
    )
    ap.add_argument("--steps", type=int, help="override the preset's steps")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size (heads, MLP scale with it)")
    ap.add_argument("--only", help="comma-separated row names to run (default: all; see the README)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="accelerator peak (bf16 dense) for MFU; default 989 (H100 SXM) on CUDA, "
        "on CPU the bf16 and fp32 matmul peaks measured in the same run",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times, interleaved; each row reports its median round and MFU "
        "uses the best peak measured (on a machine whose speed drifts, 3 keeps ratios honest)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args(argv)
    if args.child:
        return _child_main(args.child)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    import torch

    from kubetune_trainer.precision import auto_precision
    from kubetune_trainer.tiny_model import make_tiny_model

    cuda = torch.cuda.is_available()
    preset = args.preset or ("gpu-1b" if cuda else "cpu")
    p = dict(PRESETS[preset])
    if args.steps:
        p["steps"] = args.steps
    if args.hidden:
        p = scaled_model(p, args.hidden)
    precision = auto_precision("cuda" if cuda else "cpu")  # what precision: auto trains in here
    rows = rows_for(precision, cuda)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {r["name"] for r in rows})
        if unknown:
            ap.error(f"--only: unknown rows {unknown}; this device has {[r['name'] for r in rows]}")
        rows = [r for r in rows if r["name"] in wanted]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    with tempfile.TemporaryDirectory(prefix="kt-bench-train-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(
            work / "model",
            vocab_size=p["vocab"],
            hidden_size=p["hidden"],
            num_layers=p["layers"],
            num_heads=p["heads"],
            num_kv_heads=p["kv_heads"],
            intermediate_size=p["intermediate"],
            max_position_embeddings=max(2048, p["max_len"]),
            initializer_range=0.02,
        )
        data = work / "train.jsonl"
        make_dataset(data, p["examples"], seed=0)
        from transformers import AutoModelForCausalLM

        lengths = example_lengths(model_dir, data, p["max_len"])
        flops = lora_flops_per_token(AutoModelForCausalLM.from_pretrained(model_dir), lengths)
        # TRL's packed rows per step: about the tokens of `batch` examples.
        p["packed_rows"] = max(1, round(p["batch"] * sum(lengths) / len(lengths) / p["max_len"]))
        n_params = flops["params"]
        # MFU of each run against the peak of its precision.
        peaks: dict[str, float] = {}
        measured: dict[str, Any] = {}
        peak_runs: dict[str, list[dict[str, Any]]] = {}
        if args.peak_tflops is not None or cuda:
            peaks[precision] = args.peak_tflops if args.peak_tflops is not None else 989.0
        print(f"model: Llama {p['layers']}x{p['hidden']} ({n_params / 1e6:.1f}M parameters, "
              f"{flops['non_embedding_params'] / 1e6:.1f}M non-embedding), preset {preset}, "
              f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'} ({torch.get_num_threads()} threads), "
              f"{precision}; batch {p['batch']} examples, {p['steps']} steps ({p['warmup']} warm-up), "
              f"{args.rounds} round(s)", flush=True)  # fmt: skip
        print(f"model FLOPs/token (LoRA, PaLM App. B): {flops['flops_per_token'] / 1e6:.1f}M "
              f"(attention {flops['attention_flops_per_token'] / 1e6:.1f}M at T_eff {flops['t_eff']:.0f})", flush=True)  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {row["name"]: [] for row in rows}
        for round_no in range(1, args.rounds + 1):
            if args.peak_tflops is None and not cuda:  # CPU: the peak is measured again every round
                for prec in dict.fromkeys(["bf16", precision, "fp32"]):
                    m = measure_matmul_peak(dtypes[prec])
                    peak_runs.setdefault(prec, []).append(m)
                    sizes = ", ".join(f"{n}: {t:.3g}" for n, t in m["per_size"].items())
                    print(f"round {round_no}: measured {prec} matmul peak: {m['tflops']:.3g} TFLOPS (n x n "
                          f"matmul, {m['threads']} threads; TFLOPS by n {sizes})", flush=True)  # fmt: skip
            # Odd rounds run the rows in order, even rounds in reverse: a host that speeds up or
            # slows down during a round then favours neither the first rows nor the last.
            for row in rows if round_no % 2 else rows[::-1]:
                spec = {**row, "model_dir": str(model_dir), "data": str(data), "work": str(work), "p": p}
                r = run_child(spec)
                r["precision"] = row["precision"]
                r["tokens_per_second"] = r["tokens"] / r["seconds"]
                # Tokens per second of this process's CPU time (all its threads): what a busy machine
                # cannot distort as much as wall time. Wall time is the figure; this one is the check.
                r["tokens_per_cpu_second"] = r["tokens"] / r["cpu_seconds"]
                runs[row["name"]].append(r)
                print(
                    f"round {round_no}: {row['name']:>20}: {r['tokens_per_second']:,.0f} tokens/s", flush=True
                )
        for prec, ms in peak_runs.items():
            measured[prec] = best_peak(ms)
            peaks[prec] = measured[prec]["tflops"]
            print(f"{prec} matmul peak: {peaks[prec]:.3g} TFLOPS (best of {len(ms)})", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for name, rs in runs.items():
            r = median_round(rs)
            prec = r["precision"]
            r["model_tflops"] = flops["flops_per_token"] * r["tokens_per_second"] / 1e12
            extra = f", {r['model_tflops']:.3g} model TFLOPS"
            if prec in peaks:
                r["mfu"] = r["model_tflops"] / peaks[prec]
                extra += f", MFU {r['mfu']:.1%} of the {prec} peak"
            if prec in measured and measured[prec]["tflops_cpu_time"]:
                # Model FLOPs per CPU-second (times the threads) against the peak per CPU-second.
                threads = measured[prec]["threads"]
                cpu_tflops = flops["flops_per_token"] * r["tokens_per_cpu_second"] * threads / 1e12
                r["mfu_cpu_time"] = cpu_tflops / measured[prec]["tflops_cpu_time"]
                extra += f" [CPU time: MFU {r['mfu_cpu_time']:.1%}]"
            if prec != "bf16" and "bf16" in peaks:
                r["mfu_of_bf16_peak"] = r["model_tflops"] / peaks["bf16"]
                extra += f" ({r['mfu_of_bf16_peak']:.1%} of the bf16 peak)"
            if len(rs) > 1:
                extra += f"; rounds {', '.join(f'{x:,.0f}' for x in r['tokens_per_second_rounds'])} tokens/s"
            results[name] = r
            print(f"{name:>20} ({prec}): {r['tokens']:.0f} tokens in {r['seconds']:.2f} s = "
                  f"{r['tokens_per_second']:,.0f} tokens/s ({r['tokens_per_cpu_second']:,.0f} per CPU-second){extra}, peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)  # fmt: skip
        ratios = compare(results)
        for name, ratio in ratios.items():
            print(f"ratio {name}: {ratio:.2f}x")
        per_round = round_ratios(runs)
        if len(per_round) > 1:
            print("kubetune / TRL's best, round by round: " + ", ".join(f"{r:.2f}x" for r in per_round))
        if args.json:
            doc = {
                "preset": preset,
                "model": {
                    k: p[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
                },
                "params": n_params,
                "flops": flops,
                "peak_tflops": peaks,
                "measured_peaks": measured,
                "precision": precision,
                "rounds": args.rounds,
                **results,
                "ratios": ratios,
                "ratio_rounds": per_round,
            }
            args.json.write_text(json.dumps(doc, indent=2))
    return 0


def best_peak(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The peak of a run: the best round's measurement (the machine's speed when not throttled, so
    a slow moment during a peak measurement cannot flatter MFU), with every round's figure."""
    best = dict(max(measurements, key=lambda m: m["tflops"]))
    best["rounds"] = [m["tflops"] for m in measurements]
    return best


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's result over its rounds: the median round by tokens/s (the lower middle one for an
    even count), with every round's tokens/s. Rounds interleave rows, so a slow phase of the
    machine lands in every row's rounds rather than in one row's only."""
    ordered = sorted(rounds, key=lambda r: r["tokens_per_second"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["tokens_per_second_rounds"] = [r["tokens_per_second"] for r in rounds]
    return median


def round_ratios(runs: dict[str, list[dict[str, Any]]]) -> list[float]:
    """kubetune's defaults against TRL's best row of the same round, for each round (empty when
    either is missing): the spread says how much of a ratio is the host."""
    trl = [rs for name, rs in runs.items() if name.startswith("trl-")]
    if "kubetune" not in runs or not trl:
        return []
    return [
        kt["tokens_per_second"] / max(rs[i]["tokens_per_second"] for rs in trl)
        for i, kt in enumerate(runs["kubetune"])
    ]


def compare(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Throughput ratios: each kubetune row against the baseline and TRL's best row in its precision,
    and kubetune's defaults against TRL's best row of any precision (what a user of each gets at best)."""
    ratios = _ratios(results, "tokens_per_second", "")
    # The same ratios from CPU time: on a busy machine these hold where wall-time ratios do not.
    ratios.update(_ratios(results, "tokens_per_cpu_second", " [CPU time]"))
    if "kubetune" in results and any(n.startswith("trl-") for n in results):
        best = max(
            (n for n in results if n.startswith("trl-")), key=lambda n: results[n]["tokens_per_second"]
        )
        ratios[f"kubetune peak RSS / {best} peak RSS"] = (
            results["kubetune"]["peak_rss_mib"] / results[best]["peak_rss_mib"]
        )
    return ratios


def _ratios(results: dict[str, dict[str, Any]], key: str, label: str) -> dict[str, float]:
    tps = {name: r[key] for name, r in results.items()}
    ratios: dict[str, float] = {}
    for name, r in results.items():
        if not name.startswith("kubetune"):
            continue
        same = {n: v for n, v in results.items() if v["precision"] == r["precision"]}
        base = next((n for n in same if n.startswith("baseline")), None)
        if base:
            ratios[f"{name} / {base}{label}"] = tps[name] / tps[base]
        trl = [n for n in same if n.startswith("trl-")]
        if trl:
            best = max(trl, key=lambda n: tps[n])
            ratios[f"{name} / {best} (TRL's best in {r['precision']}){label}"] = tps[name] / tps[best]
    trl_all = [n for n in results if n.startswith("trl-")]
    if "kubetune" in results and trl_all:
        best = max(trl_all, key=lambda n: tps[n])
        ratios[f"kubetune / {best} (TRL's best){label}"] = tps["kubetune"] / tps[best]
    if "kubetune-packed" in results and "kubetune" in results:
        ratios[f"kubetune-packed / kubetune{label}"] = tps["kubetune-packed"] / tps["kubetune"]
    if "kubetune-fp32" in results and "kubetune" in results:
        ratios[f"kubetune / kubetune-fp32{label}"] = tps["kubetune"] / tps["kubetune-fp32"]
    return ratios


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
