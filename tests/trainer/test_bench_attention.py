"""bench/attention_backward: one small shape runs end to end and reports both kernels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kubetune_trainer import kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not kernels.cpu_has_required_flags(), reason="the kernel needs AVX-512 BF16 and AMX")
def test_the_bench_compares_both_kernels(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("attention_bench", ROOT / "bench/attention_backward/run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert (
        bench.main(
            ["--batch", "2", "--tokens", "65", "--head-dims", "64", "--repeats", "2", "--json", str(out)]
        )
        == 0
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tokens"] == 65 and row["heads"] == 12
    assert row["torch_ms"] > 0 and row["kubetune_ms"] > 0
    assert row["kubetune_error"] < 2e-2 and row["torch_error"] < 2e-2
