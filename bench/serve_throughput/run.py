"""Serving throughput: kubetune's built-in server and vLLM's CPU build, same model, adapters and load.

One run starts both servers on free ports (`kubetune serve`, and vLLM's OpenAI server from its
CPU environment when `make vllm` has set it up) with the same random-weight Llama and the same
LoRA adapters, and drives them in turn, scenario by scenario, with the same requests: concurrent
closed-loop clients (each sends its next request when the previous one ends), streaming greedy
/v1/completions, requests round-robin over the adapters.

Workloads (every request generates exactly the tokens it asks for: ignore_eos, and min_tokens
on vLLM; the bench checks each request's completion_tokens):

  fixed   every request generates --max-tokens tokens
  varlen  output lengths drawn uniformly from --min-len..--max-len (seeded: the same lengths, in
          the same order, for both servers)

For each server x workload: `mixed` (requests round-robin over the adapters) and `single`
(the same requests, all for adapter-0). Reported: req/s, generated tok/s, time to first token
p50/p99, request latency p50/p99; then mixed/single per server and kubetune/vLLM per workload,
against the targets of issue 15: throughput >= 1.5x vLLM on both workloads, TTFT p50 no worse
than vLLM's, mixed adapters within 25% of a single adapter.

    .venv/bin/python bench/serve_throughput/run.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from kubetune_trainer.tiny_model import PROMPT_WORDS

REPO = Path(__file__).resolve().parents[2]

# Issue 15's targets, checked at the end of a run.
TARGET_VS_VLLM = 1.5  # kubetune throughput / vLLM throughput, each workload
TARGET_TTFT_P50 = 1.0  # kubetune TTFT p50 / vLLM TTFT p50, at most
TARGET_MIXED_VS_SINGLE = 0.75  # mixed adapters within 25% of a single adapter

# Allocator and OpenMP runtime vLLM's CPU docs ask to preload ("set LD_PRELOAD").
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


@dataclass
class Result:
    server: str
    workload: str
    adapters: str  # "mixed" (round-robin over all) or "single" (all on adapter-0)
    requests: int
    concurrency: int
    seconds: float
    req_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    mean_batch: float | None  # kubetune only: mean sequences per generate() step
    outputs_sha: str


def build_models(
    workdir: Path, hidden: int, layers: int, n_adapters: int, rank: int
) -> tuple[Path, dict[str, Path]]:
    """A random-weight Llama and n LoRA adapters with random (non-zero) weights: speed does not depend on training."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.tiny_model import make_tiny_model

    base = workdir / f"base-h{hidden}-l{layers}"
    if not (base / "config.json").exists():
        # Head size 64: what vLLM's CPU attention kernels take.
        make_tiny_model(
            base, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64), num_kv_heads=2
        )
    adapters = {}
    for i in range(n_adapters):
        out = workdir / f"adapter-{i}-r{rank}-h{hidden}-l{layers}"
        if not (out / "adapter_config.json").exists():
            torch.manual_seed(100 + i)
            model = get_peft_model(
                AutoModelForCausalLM.from_pretrained(base),
                LoraConfig(
                    r=rank,
                    lora_alpha=2 * rank,
                    # The attention and MLP layers: vLLM serves no LoRA on lm_head.
                    target_modules=[
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ],
                    init_lora_weights=False,  # random A and B: the adapter changes the outputs
                    task_type=TaskType.CAUSAL_LM,
                ),
            )
            model.save_pretrained(out)
        adapters[f"adapter-{i}"] = out
    return base, adapters


def count_parameters(base: Path) -> int:
    cfg = json.loads((base / "config.json").read_text())
    h, inter, layers, vocab = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["vocab_size"],
    )
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q,o + k,v + MLP + 2 norms
    return layers * per_layer + 2 * vocab * h + h  # + embeddings, lm_head, final norm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_python(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The vLLM CPU environment's python, or None and why not."""
    if args.no_vllm:
        return None, "--no-vllm"
    if args.device != "cpu":
        return (
            None,
            f"--device {args.device}: vLLM's CPU build is a peer only for the built-in server on --device cpu",
        )
    if args.vllm_python:
        if not args.vllm_python.is_file():
            raise SystemExit(
                f"--vllm-python {args.vllm_python}: no such file (the python of a vLLM environment)"
            )
        return args.vllm_python, ""
    out = subprocess.run(
        [REPO / "hack/vllm-env.sh", "--print-dir"], capture_output=True, text=True, check=True
    )
    env = Path(out.stdout.strip())
    if not (env / ".complete").exists():
        return None, f"vLLM's CPU environment is not set up at {env}: run `make vllm` (hack/vllm-env.sh)"
    return env / "bin/python", ""


class Server:
    name = ""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self.log = log.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )

    def wait_ready(self, timeout: float) -> float:
        """Wait until /v1/models lists every adapter; returns the start-up seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} (log {self.log_path}):\n{tail}"
                )
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2)
                if r.status_code == 200 and self.adapters <= {m["id"] for m in r.json()["data"]}:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s (log {self.log_path})")

    def batch_stats(self) -> tuple[float, float] | None:
        return None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class KubetuneServer(Server):
    name = "kubetune"

    def __init__(
        self, base: Path, adapters: dict[str, Path], scheduling: str, args: argparse.Namespace, log: Path
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.adapters = set(adapters)
        argv = [sys.executable, "-m", "kubetune_trainer.serve", "serve", "--base-model", str(base)]
        argv += ["--served-name", "base", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--scheduling", scheduling, "--max-batch-size", str(args.max_batch_size)]
        argv += ["--device", args.device, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
        if args.cpu_threads:
            argv += ["--cpu-threads", str(args.cpu_threads)]
        for name, path in adapters.items():
            argv += ["--adapter", f"{name}={path}"]
        super().__init__(argv, {}, log)

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the running batch per decoding step (continuous batching); the static
        baselines report sequences per generate() call instead."""
        values = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(("kubetune_serve_step_batch_size_", "kubetune_serve_batch_size_")):
                name, value = line.split()
                values[name] = float(value)
        for metric in ("kubetune_serve_step_batch_size", "kubetune_serve_batch_size"):
            if values.get(f"{metric}_count"):
                return values[f"{metric}_sum"], values[f"{metric}_count"]
        return 0.0, 0.0


class VllmServer(Server):
    name = "vllm"

    def __init__(
        self, python: Path, base: Path, adapters: dict[str, Path], args: argparse.Namespace, log: Path
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.adapters = set(adapters)
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base)]
        argv += ["--served-model-name", "base", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--enable-lora", "--max-lora-rank", str(args.rank), "--max-loras", str(len(adapters))]
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
        argv += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--seed", "0"]
        argv += ["--disable-uvicorn-access-log", *args.vllm_arg]
        env = self.cpu_env(python, args)
        print(f"[vllm] {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        if not TCMALLOC.exists():
            print(
                f"[vllm] {TCMALLOC} not found: vLLM's CPU docs ask for tcmalloc preloaded; "
                "`make vllm` installs it as root (or: apt-get install libtcmalloc-minimal4)",
                flush=True,
            )
        super().__init__(argv, env, log)

    @staticmethod
    def cpu_env(python: Path, args: argparse.Namespace) -> dict[str, str]:
        """What vLLM's CPU docs recommend: KV cache size, OpenMP cores, tcmalloc + Intel OpenMP preloaded."""
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib), "HF_HUB_OFFLINE": "1"}
        cpus = os.cpu_count() or 1
        if args.cpu_threads:
            # The same number of compute threads as the built-in server, on the highest cores,
            # which leaves the others to the API server process (VLLM_CPU_NUM_OF_RESERVED_CPU's idea).
            first = max(cpus - args.cpu_threads, 0)
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{cpus - 1}" if first < cpus - 1 else str(first)
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
        preload = [str(p) for p in (TCMALLOC, python.parent.parent / "lib/libiomp5.so") if p.exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        return env


def workload_lengths(name: str, n: int, args: argparse.Namespace) -> list[int]:
    if name == "fixed":
        return [args.max_tokens] * n
    rng = random.Random(args.seed)
    return [rng.randint(args.min_len, args.max_len) for _ in range(n)]


def make_requests(n: int, models: list[str], lengths: list[int], prompt_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "model": models[i % len(models)],
            "prompt": " ".join(rng.choices(PROMPT_WORDS, k=prompt_words)),
            "tokens": lengths[i],
        }
        for i in range(n)
    ]


@dataclass
class Measured:
    ttft: float
    latency: float
    tokens: int
    text: str


async def one_request(client: httpx.AsyncClient, req: dict) -> Measured:
    body = {
        "model": req["model"],
        "prompt": req["prompt"],
        "max_tokens": req["tokens"],
        "min_tokens": req["tokens"],
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, text = None, None, []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{req['model']}: HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{req['model']}: error in stream: {chunk['error']}")
            if chunk.get("choices"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(chunk["choices"][0].get("text") or "")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    if tokens != req["tokens"]:
        raise RuntimeError(
            f"asked for exactly {req['tokens']} tokens (ignore_eos, min_tokens) and got {tokens}: "
            "the server did not honour the length, so the servers would not do the same work"
        )
    return Measured(ttft if ttft is not None else latency, latency, tokens, "".join(text))


async def drive(
    url: str, requests: list[dict], concurrency: int, label: str | None
) -> tuple[float, list[Measured]]:
    results: list[Measured | None] = [None] * len(requests)
    todo = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = tqdm(
        total=len(requests), desc=label, unit="req", leave=False, disable=label is None, file=sys.stderr
    )
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:

        async def worker() -> None:
            for i in todo:
                results[i] = await one_request(client, requests[i])
                bar.update()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    bar.close()
    return seconds, [r for r in results if r is not None]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_scenario(
    server: Server, workload: str, adapters: str, models: list[str], args: argparse.Namespace
) -> Result:
    lengths = workload_lengths(workload, args.requests, args)
    reqs = make_requests(args.requests, models, lengths, args.prompt_words, seed=args.seed)
    stats0 = server.batch_stats()
    seconds, got = asyncio.run(
        drive(server.url, reqs, args.concurrency, f"{server.name} {workload} {adapters}")
    )
    stats1 = server.batch_stats()
    batch = None
    if stats0 and stats1:
        batch = round((stats1[0] - stats0[0]) / max(stats1[1] - stats0[1], 1), 2)
    ttft = [m.ttft * 1000 for m in got]
    lat = [m.latency * 1000 for m in got]
    return Result(
        server=server.name,
        workload=workload,
        adapters=adapters,
        requests=len(reqs),
        concurrency=args.concurrency,
        seconds=round(seconds, 3),
        req_per_s=round(len(reqs) / seconds, 2),
        tokens_per_s=round(sum(m.tokens for m in got) / seconds, 1),
        ttft_p50_ms=round(statistics.median(ttft), 1),
        ttft_p99_ms=round(pct(ttft, 0.99), 1),
        latency_p50_ms=round(statistics.median(lat), 1),
        latency_p99_ms=round(pct(lat, 0.99), 1),
        mean_batch=batch,
        outputs_sha=hashlib.sha256(json.dumps([m.text for m in got]).encode()).hexdigest()[:12],
    )


def start(server: Server, names: list[str], args: argparse.Namespace, timeout: float) -> None:
    print(f"[{server.name}] starting (log {server.log_path})", flush=True)
    print(f"[{server.name}] ready after {server.wait_ready(timeout):.0f} s", flush=True)
    # Warm-up outside the timed runs: first-call overheads, allocator, every adapter once.
    warm = make_requests(args.concurrency, names, [4] * args.concurrency, args.prompt_words, seed=99)
    asyncio.run(drive(server.url, warm, args.concurrency, None))


def scenarios(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(workload, adapters) pairs in the order they run."""
    return [
        (workload, adapters)
        for workload in args.workloads
        for adapters in ("mixed", "single")
        if adapters == "mixed" or workload in args.single_on
    ]


def report(r: Result) -> None:
    print(
        f"[{r.server}] {r.workload:<6} {r.adapters:<6} {r.req_per_s:6.2f} req/s {r.tokens_per_s:7.1f} tok/s  "
        f"TTFT p50 {r.ttft_p50_ms:.0f} ms p99 {r.ttft_p99_ms:.0f} ms",
        flush=True,
    )


def print_results(results: list[Result]) -> None:
    header = (
        f"{'server':<9} {'workload':<8} {'adapters':<8} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'lat p50':>8} {'lat p99':>8} {'batch':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        batch = f"{r.mean_batch:6.2f}" if r.mean_batch is not None else f"{'-':>6}"
        print(
            f"{r.server:<9} {r.workload:<8} {r.adapters:<8} {r.req_per_s:>7.2f} {r.tokens_per_s:>7.1f} "
            f"{r.ttft_p50_ms:>9.0f} {r.ttft_p99_ms:>9.0f} {r.latency_p50_ms:>8.0f} {r.latency_p99_ms:>8.0f} {batch}"
        )


def compare(results: list[Result]) -> tuple[dict, bool]:
    """mixed/single per server x workload, kubetune/vLLM per workload (mixed adapters), with targets."""
    by = {(r.server, r.workload, r.adapters): r for r in results}
    ratios: dict = {"mixed_vs_single": {}, "kubetune_vs_vllm": {}}
    ok = True
    print(f"\nmixed adapters / single adapter (req/s; target >= {TARGET_MIXED_VS_SINGLE}, within 25%)")
    for (server, workload, adapters), r in by.items():
        if adapters != "mixed":
            continue
        if (server, workload, "single") not in by:
            continue
        ratio = r.req_per_s / by[(server, workload, "single")].req_per_s
        ratios["mixed_vs_single"][f"{server}/{workload}"] = round(ratio, 3)
        met = ratio >= TARGET_MIXED_VS_SINGLE
        ok &= met or server != "kubetune"
        print(f"  {server:<9} {workload:<6} {ratio:5.2f}  {'PASS' if met else 'MISS'}")
    workloads = [w for (s, w, a) in by if s == "vllm" and a == "mixed"]
    if not workloads:
        return ratios, ok
    print("\nkubetune / vLLM (mixed adapters)")
    print(f"  {'workload':<8} {'req/s':>6} {'tok/s':>6} {'TTFT p50':>9} {'TTFT p99':>9}")
    for workload in workloads:
        k, v = by[("kubetune", workload, "mixed")], by[("vllm", workload, "mixed")]
        row = {
            "req_per_s": round(k.req_per_s / v.req_per_s, 3),
            "tokens_per_s": round(k.tokens_per_s / v.tokens_per_s, 3),
            "ttft_p50": round(k.ttft_p50_ms / v.ttft_p50_ms, 3),
            "ttft_p99": round(k.ttft_p99_ms / v.ttft_p99_ms, 3),
        }
        ratios["kubetune_vs_vllm"][workload] = row
        print(
            f"  {workload:<8} {row['req_per_s']:>6.2f} {row['tokens_per_s']:>6.2f} "
            f"{row['ttft_p50']:>9.2f} {row['ttft_p99']:>9.2f}"
        )
    print("\ntargets (issue 15)")
    for workload, row in ratios["kubetune_vs_vllm"].items():
        met = row["tokens_per_s"] >= TARGET_VS_VLLM
        ok &= met
        print(
            f"  {workload} throughput >= {TARGET_VS_VLLM}x vLLM: {row['tokens_per_s']:.2f}x  {'PASS' if met else 'MISS'}"
        )
        met = row["ttft_p50"] <= TARGET_TTFT_P50
        ok &= met
        print(
            f"  {workload} TTFT p50 no worse than vLLM: {row['ttft_p50']:.2f}x  {'PASS' if met else 'MISS'}"
        )
    return ratios, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="32 requests per scenario, single adapter on the fixed workload only: a few minutes",
    )
    p.add_argument(
        "--requests", type=int, default=None, help="timed requests per scenario (default 96; --quick 32)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="concurrent closed-loop clients")
    p.add_argument("--workloads", nargs="+", choices=["fixed", "varlen"], default=["fixed", "varlen"])
    p.add_argument(
        "--single-on",
        nargs="*",
        choices=["fixed", "varlen"],
        help="workloads that also run all requests on one adapter (default: both; --quick: fixed)",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request of the fixed workload")
    p.add_argument("--min-len", type=int, default=8, help="shortest output of the varlen workload")
    p.add_argument("--max-len", type=int, default=256, help="longest output of the varlen workload")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the varlen workload's lengths")
    p.add_argument("--prompt-words", type=int, default=24, help="words per prompt")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--adapters", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--max-model-len", type=int, default=1024, help="both servers' prompt + completion limit")
    p.add_argument("--max-batch-size", type=int, default=16, help="kubetune's --max-batch-size")
    p.add_argument(
        "--device", default="cpu", help="kubetune's --device (vLLM runs only with cpu: its CPU build)"
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="compute threads of each server on CPU: kubetune's --cpu-threads, and as many cores bound for "
        "vLLM's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND). 0: each server's own default. 1 keeps results "
        "stable on a shared machine, where spare cores are not guaranteed",
    )
    p.add_argument("--no-vllm", action="store_true", help="run the built-in server alone")
    p.add_argument(
        "--vllm-python", type=Path, help="python of a vLLM environment (default: hack/vllm-env.sh's)"
    )
    p.add_argument("--vllm-kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument(
        "--vllm-arg", action="append", default=[], help="one more argument for vLLM's server (repeatable)"
    )
    p.add_argument(
        "--scheduling-baselines",
        action="store_true",
        help="also run kubetune's per_adapter and sequential (switch adapters per request) schedulings",
    )
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kubetune-serve-throughput")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.requests is None:
        args.requests = 32 if args.quick else 96
    if args.single_on is None:
        args.single_on = ["fixed"] if args.quick else ["fixed", "varlen"]
    if not 1 <= args.min_len <= args.max_len:
        p.error(f"--min-len {args.min_len} and --max-len {args.max_len}: need 1 <= min-len <= max-len")

    python, why_not = vllm_python(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, adapters = build_models(args.workdir, args.hidden_size, args.layers, args.adapters, args.rank)
    names = list(adapters)
    params = count_parameters(base)
    print(
        f"model: random-weight Llama, {args.layers} x {args.hidden_size}, {params / 1e6:.0f}M parameters, {args.dtype}; "
        f"{len(names)} rank-{args.rank} adapters; {args.concurrency} clients, {args.requests} requests per scenario",
        flush=True,
    )
    if python is None:
        print(f"vLLM: not run ({why_not}); measuring the built-in server alone", flush=True)

    results: list[Result] = []
    servers: list[Server] = []
    try:
        # Both servers stay up (an idle one takes no CPU) and take turns scenario by scenario, so
        # a change in the machine's load between the start and the end of a run hits both alike.
        servers.append(KubetuneServer(base, adapters, "mixed", args, args.workdir / "server-kubetune.log"))
        start(servers[-1], names, args, timeout=600)
        if python is not None:
            servers.append(VllmServer(python, base, adapters, args, args.workdir / "server-vllm.log"))
            start(servers[-1], names, args, timeout=1200)  # ~1 min alone, minutes on a busy machine
        for workload, mode in scenarios(args):
            for server in servers:
                results.append(
                    run_scenario(server, workload, mode, names if mode == "mixed" else names[:1], args)
                )
                report(results[-1])
    finally:
        for server in servers:
            server.stop()

    if args.scheduling_baselines:
        for scheduling in ("per_adapter", "sequential"):
            server = KubetuneServer(
                base, adapters, scheduling, args, args.workdir / f"server-{scheduling}.log"
            )
            server.name = f"kubetune-{scheduling}"
            try:
                start(server, names, args, timeout=600)
                results.append(run_scenario(server, "fixed", "mixed", names, args))
                report(results[-1])
            finally:
                server.stop()

    print_results(results)
    ratios, ok = compare(results)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(
        f"\nmachine: {machine}; device {args.device}; compute threads per server: {args.cpu_threads or 'default'}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": machine,
                    "parameters": params,
                    "vllm": str(python) if python else f"not run: {why_not}",
                    "results": [asdict(r) for r in results],
                    "ratios": ratios,
                    "targets": {
                        "kubetune_vs_vllm_throughput": TARGET_VS_VLLM,
                        "kubetune_vs_vllm_ttft_p50_at_most": TARGET_TTFT_P50,
                        "mixed_vs_single": TARGET_MIXED_VS_SINGLE,
                    },
                    "all_targets_met": ok,
                },
                indent=2,
            )
        )
        print(f"results: {args.json}")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
