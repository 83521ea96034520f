"""ModelFinetuner end to end on the tiny model: the guide's API, every method, outputs, resume, EWC."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.exit_codes import ConfigError, ExitCode, UnsupportedHardwareError
from kubetune_trainer.quickstart import make_task_records


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("task")
    rows = make_task_records(112, seed=1)
    return {
        "train": _write(d / "train.jsonl", rows[:64]),
        "validation": _write(d / "val.jsonl", rows[64:80]),
        "test": _write(d / "test.jsonl", rows[80:96]),
        "replay": _write(
            d / "replay.jsonl", [{"text": f"old task text number {i} about cats"} for i in range(16)]
        ),
    }


def _config(tiny_model_dir: Path, task_files: dict[str, Path], out: Path, **kw) -> FinetuningConfig:
    base = {
        "model_name": str(tiny_model_dir),
        "output_dir": str(out),
        "train_file": str(task_files["train"]),
        "validation_file": str(task_files["validation"]),
        "method": "lora",
        "max_steps": 12,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "eval_max_examples": 8,
        "eval_max_new_tokens": 12,
        "progress_bar": False,
        "resume": "never",
        "seed": 0,
        # These tests compare logits with fp32 reloads at fp32 tolerances; auto would pick bf16 on
        # CPUs with AMX / AVX-512 BF16 (test_precision.py covers that).
        "precision": "fp32",
    }
    return FinetuningConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, task_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One LoRA run through the guide's API: load_model, train, evaluate, save_model."""
    out = tmp_path_factory.mktemp("lora-out")
    cfg = _config(
        tiny_model_dir,
        task_files,
        out,
        packing=True,
        metrics=["perplexity", "exact_match", "token_f1", "bleu", "rouge", "accuracy", "confusion_matrix"],
    )
    ft = ModelFinetuner(cfg)
    ft.load_model()
    ft.train()
    metrics = ft.evaluate()
    ft.save_model()
    ft.close()
    return ft, metrics, out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_evaluate_reports_loss_perplexity_and_configured_metrics(trained) -> None:
    ft, metrics, _ = trained
    assert math.isclose(metrics["eval_perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-6)
    for name in ("eval_exact_match", "eval_token_f1", "eval_rouge1", "eval_rougeL", "eval_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert 0.0 <= metrics["eval_bleu"] <= 100.0
    cm = metrics["eval_confusion_matrix"]
    assert sum(map(sum, cm["matrix"])) == 8  # eval_max_examples
    # Training made progress: the loss of the last logged steps is below the first.
    losses = [h["loss"] for h in ft.trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_saved_adapter_loads_with_plain_peft_and_gives_the_same_logits(trained, tiny_model_dir: Path) -> None:
    ft, _, out = trained
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = ft.tokenizer("### Instruction:\nTranslate red blue", return_tensors="pt").input_ids
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = _logits(ft.model, ids)
    assert torch.allclose(_logits(reloaded, ids), expected, atol=1e-5)
    # ... and the adapter does something: the base model alone differs.
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-3)


def test_output_has_tokenizer_and_provenance(
    trained, task_files: dict[str, Path], tiny_model_dir: Path
) -> None:
    _, metrics, out = trained
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["base_model"]["name"] == str(tiny_model_dir)
    assert (
        prov["base_model"]["config_sha256"]
        == hashlib.sha256((tiny_model_dir / "config.json").read_bytes()).hexdigest()
    )
    train_sha = hashlib.sha256(task_files["train"].read_bytes()).hexdigest()
    assert prov["datasets"][str(task_files["train"])] == train_sha
    assert prov["config"]["method"] == "lora" and prov["config"]["max_steps"] == 12
    assert prov["metrics"]["eval"]["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert 0 < prov["parameters"]["trainable"] < prov["parameters"]["total"]
    assert prov["global_step"] == 12
    # The curves come with every run, trackers only when asked for.
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h][-1] == 12
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "tensorboard").exists()
    # Checkpoints live apart from the final output.
    assert sorted(p.name for p in (out / "checkpoints").iterdir())


def test_load_finetuned_model_generate_and_test(trained, tiny_model_dir: Path, task_files) -> None:
    ft, _, out = trained
    prompt = {"instruction": "Translate the colours into code words.", "input": "red blue"}
    expected = ft.generate(prompt, max_new_tokens=8, temperature=0)
    fresh = ModelFinetuner(FinetuningConfig(model_name=str(tiny_model_dir), train_file="unused.jsonl"))
    fresh.load_finetuned_model(out)
    assert fresh.generate(prompt, max_new_tokens=8, temperature=0) == expected
    sampled = fresh.generate("The capital of France is", max_new_tokens=5, temperature=0.7)
    assert isinstance(sampled, str)
    rows = [json.loads(line) for line in task_files["test"].read_text().splitlines()]
    fresh.config = fresh.config.model_copy(
        update={"metrics": ["exact_match", "token_f1"], "eval_max_examples": 4}
    )
    res = fresh.test(rows)
    assert set(res) >= {"test_loss", "test_perplexity", "test_exact_match", "test_token_f1"}
    with pytest.raises(ConfigError, match="no test data"):
        fresh.test()


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning", "full"])
def test_other_methods_train_save_and_reload(
    method: str, tiny_model_dir: Path, task_files, tmp_path: Path
) -> None:
    cfg = _config(
        tiny_model_dir,
        task_files,
        tmp_path / "out",
        method=method,
        max_steps=4,
        virtual_tokens={"num_virtual_tokens": 4},
    )
    ft = ModelFinetuner(cfg)
    model = ft.load_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sigterm_before = signal.getsignal(signal.SIGTERM)
    ft.train()
    # No close(): the preemption handler is gone once train() returns, so SIGTERM stops the process again.
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    after = dict(ft.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable parameter changed"
    out = ft.save_model()
    ids = ft.tokenizer("### Instruction:\nhello", return_tensors="pt").input_ids
    expected = _logits(ft.model, ids)
    fresh = ModelFinetuner(cfg)
    fresh.load_finetuned_model(out)
    if method == "full":
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    else:
        assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == 4
    assert torch.allclose(_logits(fresh.model, ids), expected, atol=1e-5)


def _same_weights(model, checkpoint: Path) -> bool:
    """Whether ``model`` holds exactly the weights a Trainer checkpoint saved (full fine-tuning)."""
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    params = model.state_dict()
    assert saved and set(saved) <= set(params)
    return all(torch.equal(params[k].detach().cpu(), v) for k, v in saved.items())


def test_early_stopping_keeps_the_best_checkpoint(tiny_model_dir: Path, task_files, tmp_path: Path) -> None:
    # Full fine-tuning (the output layer too) at a learning rate this large makes eval_loss worse
    # after the first evaluation, so the best checkpoint (step 2) is not the last one (step 4).
    # (LoRA cannot: with the tiny model's frozen output layer the loss only creeps towards uniform.)
    cfg = _config(
        tiny_model_dir,
        task_files,
        tmp_path / "out",
        method="full",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_steps=40,
        eval_steps=2,
        early_stopping={"metric": "eval_loss", "patience": 1},
    )
    ft = ModelFinetuner(cfg)
    ft.train()
    evals = [(h["step"], h["eval_loss"]) for h in ft.trainer.state.log_history if "eval_loss" in h]
    assert [s for s, _ in evals] == [2, 4] and evals[1][1] > evals[0][1], evals
    assert ft.trainer.state.global_step == 4
    ckpts = tmp_path / "out" / "checkpoints"
    assert ft.trainer.state.best_model_checkpoint == str(ckpts / "checkpoint-2")
    # The output is the best checkpoint's weights, not the last one's.
    assert _same_weights(ft.model, ckpts / "checkpoint-2")
    assert not _same_weights(ft.model, ckpts / "checkpoint-4")
    assert ft.trainer.args.load_best_model_at_end
    out = ft.save_model()
    ft.close()
    fresh = ModelFinetuner(cfg)
    fresh.load_finetuned_model(out)
    assert _same_weights(fresh.model, ckpts / "checkpoint-2")


def _fake_checkpoint(root: Path, step: int, files: dict[str, str]) -> Path:
    d = root / f"checkpoint-{step}"
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def test_last_complete_checkpoint_skips_half_written_folders(tmp_path: Path) -> None:
    from kubetune_trainer.storage.resume import last_complete_checkpoint

    root = tmp_path / "checkpoints"
    assert last_complete_checkpoint(root) is None  # no folder yet
    state = json.dumps({"global_step": 1})
    for step in (10, 20):
        _fake_checkpoint(
            root,
            step,
            {
                "trainer_state.json": state,
                "latest": f"global_step{step}",
                f"global_step{step}/mp_rank_00_model_states.pt": "x",
            },
        )
    # Killed after the weights (no trainer_state.json), while writing it (truncated JSON), and
    # under DeepSpeed before `latest` (trainer_state.json is written later, but a stale one may be there).
    _fake_checkpoint(root, 30, {"adapter_model.safetensors": "w"})
    _fake_checkpoint(root, 40, {"adapter_model.safetensors": "w", "trainer_state.json": '{"global_st'})
    _fake_checkpoint(root, 50, {"trainer_state.json": state, "global_step50/x.pt": "x"})
    _fake_checkpoint(root, 60, {"trainer_state.json": state, "latest": "global_step60"})  # names no folder
    (root / "checkpoint-99-tmp").mkdir()
    (root / "checkpoint-70").write_text("a file, not a folder")

    assert last_complete_checkpoint(root, deepspeed=True) == str(root / "checkpoint-20")
    # Without DeepSpeed, `latest` does not matter: checkpoint-60 is complete.
    assert last_complete_checkpoint(root, deepspeed=False) == str(root / "checkpoint-60")
    # Numeric order, not lexical: 100 is newer than 60.
    _fake_checkpoint(root, 100, {"trainer_state.json": state})
    assert last_complete_checkpoint(root) == str(root / "checkpoint-100")


def test_resume_skips_an_incomplete_newest_local_checkpoint(
    tiny_model_dir: Path, task_files, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "out"
    first = ModelFinetuner(_config(tiny_model_dir, task_files, out, max_steps=4, save_steps=2))
    first.train()
    ckpts = out / "checkpoints"
    # A pod killed (kill -9) while Trainer was writing checkpoint-6: weights there, trainer_state.json not.
    partial = ckpts / "checkpoint-6"
    partial.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (partial / name).write_bytes((ckpts / "checkpoint-4" / name).read_bytes())
    second = ModelFinetuner(
        _config(tiny_model_dir, task_files, out, max_steps=8, save_steps=2, resume="auto")
    )
    with caplog.at_level(logging.INFO, logger="kubetune_trainer"):
        second.train()
    resumed = [r.getMessage() for r in caplog.records if "resuming from local checkpoint" in r.getMessage()]
    assert len(resumed) == 1 and resumed[0].split()[4].endswith("checkpoint-4"), resumed
    assert "skipping incomplete local checkpoint" in caplog.text
    assert second.trainer.state.global_step == 8
    # The history is the first run's 4 steps, then 5-8 trained here (none repeated).
    assert [h["step"] for h in second.trainer.state.log_history if "loss" in h] == list(range(1, 9))
    # The step-6 checkpoint was rewritten complete by this run.
    assert json.loads((partial / "trainer_state.json").read_text())["global_step"] == 6


def test_merge_adapter_gives_the_same_logits(tiny_model_dir: Path, task_files, tmp_path: Path) -> None:
    ft = ModelFinetuner(
        _config(tiny_model_dir, task_files, tmp_path / "out", max_steps=3, merge_adapter=True)
    )
    ft.train()
    out = ft.save_model()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = ft.tokenizer("red blue green", return_tensors="pt").input_ids
    assert torch.allclose(_logits(merged, ids), _logits(ft.model, ids), atol=1e-4)


def test_ewc_holds_important_parameters_near_their_anchor(
    tiny_model_dir: Path, task_files, tmp_path: Path
) -> None:
    def run(ewc_lambda: float) -> ModelFinetuner:
        cfg = _config(
            tiny_model_dir,
            task_files,
            tmp_path / f"out-{ewc_lambda}",
            max_steps=6,
            replay_file=str(task_files["replay"]),
            replay_fraction=0.25,
            ewc_lambda=ewc_lambda,
            ewc_samples=8,
        )
        ft = ModelFinetuner(cfg)
        ft.train()
        return ft

    held = run(1e7)
    ewc = held.trainer.ewc
    assert ewc is not None and len(ewc.fisher) > 0
    assert any(float(f.sum()) > 0 for f in ewc.fisher.values())
    free = run(0.0)
    assert free.trainer.ewc is None

    def fisher_distance(ft: ModelFinetuner) -> float:
        # What EWC penalises: movement weighted by importance for the replay data. Both runs
        # start from the same seeded adapter, so the anchor is the same.
        params = dict(ft.model.named_parameters())
        return sum(
            float((f * (params[n].detach() - ewc.anchor[n]) ** 2).sum()) for n, f in ewc.fisher.items()
        )

    assert fisher_distance(held) < 0.1 * fisher_distance(free)


def test_generation_metrics_on_plain_text_data_fail_before_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    text = _write(tmp_path / "t.jsonl", [{"text": f"sentence {i}"} for i in range(8)])
    cfg = FinetuningConfig(
        model_name=str(tiny_model_dir),
        output_dir=str(tmp_path / "out"),
        train_file=str(text),
        validation_file=str(text),
        metrics=["exact_match"],
        progress_bar=False,
    )
    with pytest.raises(ConfigError, match="plain text"):
        ModelFinetuner(cfg).train()


def test_qlora_without_cuda_fails_before_loading_anything(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = FinetuningConfig(model_name=str(tmp_path / "no-such-model"), train_file="t.jsonl", method="qlora")
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU") as err:
        ModelFinetuner(cfg).load_model()  # the missing model directory is never looked at
    assert err.value.exit_code == ExitCode.UNSUPPORTED_HARDWARE


def test_semantic_similarity_without_its_package_fails_before_loading_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):  # sentence-transformers is not installed (here, or any more)
        return (
            None if name.split(".")[0] == "sentence_transformers" else real_find_spec(name, *args, **kwargs)
        )

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cfg = FinetuningConfig(
        model_name=str(tmp_path / "no-such-model"),
        train_file="t.jsonl",
        metrics=["semantic_similarity"],
        semantic_model="sentence-transformers/all-MiniLM-L6-v2",
    )
    with pytest.raises(ConfigError, match="needs the sentence-transformers package") as err:
        ModelFinetuner(cfg).load_model()  # the missing model directory is never looked at
    assert "semantic_model: 'sentence-transformers/all-MiniLM-L6-v2'" in str(err.value)
    assert err.value.exit_code == ExitCode.BAD_CONFIG
    # The same check guards train() when the model was loaded another way.
    ft = ModelFinetuner(cfg)
    with pytest.raises(ConfigError, match="needs the sentence-transformers package"):
        ft._check_metrics_fit_data(None)


def test_semantic_model_relative_to_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "embedder").mkdir()
    (tmp_path / "job.yaml").write_text(
        "model_name: m\ntrain_file: t.jsonl\nmetrics: [semantic_similarity]\nsemantic_model: embedder\n"
    )
    cfg = FinetuningConfig.from_yaml(tmp_path / "job.yaml")
    assert cfg.semantic_model == str(tmp_path / "embedder")
    named = FinetuningConfig(model_name="m", train_file="t.jsonl", semantic_model="org/model").resolve_paths(
        tmp_path
    )
    assert named.semantic_model == "org/model"  # not a directory here: a model name, left as is


def test_missing_model_directory_is_a_config_error(tmp_path: Path) -> None:
    cfg = FinetuningConfig(model_name=str(tmp_path / "nope"), train_file="t.jsonl")
    with pytest.raises(ConfigError, match="directory not found"):
        ModelFinetuner(cfg).load_model()
