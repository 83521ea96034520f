"""The quickstart: its task data, and the whole run proving the adapter learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.quickstart import CODEBOOK, make_task_records, run_quickstart, write_task_data


def test_task_records_are_correct_and_splits_disjoint(tmp_path: Path) -> None:
    paths = write_task_data(tmp_path)
    splits = {name: [json.loads(line) for line in p.read_text().splitlines()] for name, p in paths.items()}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [800, 100, 100]
    inputs = {name: {r["input"] for r in rows} for name, rows in splits.items()}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    for row in splits["test"]:
        assert row["output"] == " ".join(CODEBOOK[w] for w in row["input"].split())
    assert make_task_records(5, seed=7) == make_task_records(5, seed=7)


@pytest.mark.slow
def test_quickstart_learns_the_task(tmp_path: Path, capsys) -> None:
    assert run_quickstart(tmp_path / "qs") == 0
    out = capsys.readouterr().out
    assert "The adapter learned the task" in out
    row = next(
        line for line in out.splitlines() if line.strip().startswith("exact match") and "," not in line
    )
    before, after = (float(x) for x in row.split()[-2:])
    assert before < 0.1 and after > 0.5
    assert (tmp_path / "qs" / "adapter" / "adapter_model.safetensors").is_file()
