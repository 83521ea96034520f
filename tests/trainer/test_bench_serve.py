"""bench/serve_throughput: a real (tiny) run of the built-in server, and what it says without vLLM."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "serve_throughput" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kt_bench_serve_throughput", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_parameter_count_matches_the_model(bench, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, _ = bench.build_models(tmp_path, hidden=128, layers=2, n_adapters=0, rank=8)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert bench.count_parameters(base) == sum(p.numel() for p in model.parameters())


def test_without_vllm_the_bench_says_so_and_measures_the_builtin_server(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    env = {
        **os.environ,
        "KUBETUNE_CACHE": str(tmp_path / "no-cache"),  # hack/vllm-env.sh finds no vLLM there
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("operator", "trainer-image", ".")),
    }
    argv = [sys.executable, str(BENCH), "--hidden-size", "64", "--layers", "2", "--rank", "4"]
    argv += ["--requests", "4", "--concurrency", "2", "--max-tokens", "5", "--min-len", "2", "--max-len", "9"]
    argv += ["--prompt-words", "4", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vLLM: not run" in run.stdout and "make vllm" in run.stdout, run.stdout

    report = json.loads(out.read_text())
    assert report["vllm"].startswith("not run")
    rows = {(r["server"], r["workload"], r["adapters"]): r for r in report["results"]}
    assert set(rows) == {("kubetune", w, a) for w in ("fixed", "varlen") for a in ("mixed", "single")}
    # Every request generated exactly its tokens (the bench checks each one): 4 x 5, and the
    # seeded varlen lengths, which the same seed reproduces.
    import random

    rng = random.Random(0)
    varlen_tokens = sum(rng.randint(2, 9) for _ in range(4))
    for (_, workload, _), r in rows.items():
        expected = 20 if workload == "fixed" else varlen_tokens
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(expected, rel=0.02), r
        assert 0 < r["ttft_p50_ms"] <= r["latency_p50_ms"], r
        assert r["mean_batch"] >= 1, r
    assert set(report["ratios"]["mixed_vs_single"]) == {"kubetune/fixed", "kubetune/varlen"}
    assert report["ratios"]["kubetune_vs_vllm"] == {}
