"""bench/cpu_kernels: one small shape of each kernel runs end to end, against what it replaces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kubetune_trainer import kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not kernels.cpu_has_required_flags(), reason="the kernel needs AVX-512 BF16 and AMX")
def test_the_bench_compares_both_kernels(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("cpu_kernels_bench", ROOT / "bench/cpu_kernels/run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    args = ["--batch", "2", "--tokens", "65", "--head-dims", "64", "--repeats", "2", "--norm-hidden", "72"]
    args += ["--mlp-widths", "88", "--rotary-heads", "4"]
    assert bench.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["tokens"] == 65 and row["heads"] == 12
    assert row["torch_ms"] > 0 and row["kubetune_ms"] > 0
    assert row["kubetune_error"] < 2e-2 and row["torch_error"] < 2e-2
    (norm,) = result["rms_norm"]
    assert norm["hidden"] == 72 and norm["tensor_ms"] > 0 and norm["kubetune_ms"] > 0
    (swiglu,) = result["swiglu"]
    assert swiglu["width"] == 88 and swiglu["torch_ms"] > 0 and swiglu["kubetune_ms"] > 0
    (rotary,) = result["rotary"]
    assert rotary["heads"] == 4 and rotary["torch_ms"] > 0 and rotary["kubetune_ms"] > 0
