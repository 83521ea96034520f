"""bench/continual: the tasks conflict as documented, and a tiny run leaves every task's adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "continual" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kt_bench_continual", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tasks_share_inputs_and_disagree_on_every_answer(bench) -> None:
    inputs = bench.task_inputs(210)
    assert len(set(inputs)) == 210
    tasks = [bench.task_records(inputs, t) for t in range(3)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert all(x["input"] == y["input"] for x, y in zip(tasks[a], tasks[b], strict=True))
        assert all(x["output"] != y["output"] for x, y in zip(tasks[a], tasks[b], strict=True))
        assert tasks[a][0]["instruction"] != tasks[b][0]["instruction"]


def test_a_tiny_run_measures_task_1_after_every_task(bench, tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--first-steps", "2", "--steps", "2", "--train-examples", "16"]
    assert bench.main([*args, "--test-examples", "4", "--strategies", "none", "ewc"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"none", "ewc"}
    for strategy, rows in results.items():
        assert [sorted(k for k in r if k.startswith("task")) for r in rows] == [
            ["task1"],
            ["task1", "task2"],
            ["task1", "task2", "task3"],
        ]
        assert (tmp_path / strategy / "adapter_config.json").is_file()  # task 2
        provenance = json.loads((tmp_path / strategy / "task-2" / "provenance.json").read_text())  # task 3
        assert provenance["continued_from"] == str(tmp_path / strategy)
        first = json.loads((tmp_path / strategy / "provenance.json").read_text())
        assert first["continued_from"] == str(tmp_path / "task-1")  # task 2 continued task 1's adapter
