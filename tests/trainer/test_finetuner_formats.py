"""Each data file is read with its own format: validation_format / test_format (a FineTuneJob's
dataset.validation.format / dataset.test.format), data_format when unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.data import DataError
from kubetune_trainer.quickstart import make_task_records


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("formats")
    rows = make_task_records(48, seed=3)
    completion = [{"prompt": r["input"], "completion": r["output"]} for r in rows[32:40]]
    chat = [
        {"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
        for r in rows[40:]
    ]
    return {
        "train": _write(d / "train.jsonl", rows[:32]),
        "validation": _write(d / "val.jsonl", completion),
        "test": _write(d / "test.jsonl", chat),
    }


def _finetuner(model: Path, out: Path, files: dict[str, str], **kw) -> ModelFinetuner:
    cfg = FinetuningConfig(
        model_name=str(model),
        output_dir=str(out),
        train_file=files["train"],
        validation_file=files["validation"],
        test_file=files["test"],
        data_format="instruction",
        max_seq_length=256,
        progress_bar=False,
        **kw,
    )
    ft = ModelFinetuner(cfg)
    ft.load_model()
    return ft


def test_validation_and_test_files_are_read_with_their_own_format(
    tiny_model_dir: Path, files: dict[str, str], tmp_path: Path
) -> None:
    ft = _finetuner(tiny_model_dir, tmp_path, files, validation_format="completion", test_format="chat")
    try:
        data = ft.prepare_data()
    finally:
        ft.close()
    assert {ex["format"] for ex in data.eval_examples("train")} == {"instruction"}
    validation = data.eval_examples("validation")
    assert len(validation) == 8 and {ex["format"] for ex in validation} == {"completion"}
    assert (
        validation[0]["reference"].strip()
        == json.loads(Path(files["validation"]).read_text().splitlines()[0])["completion"].strip()
    )
    test = data.eval_examples("test")
    assert len(test) == 8 and {ex["format"] for ex in test} == {"chat"}


def test_unset_validation_format_means_the_train_files_format(
    tiny_model_dir: Path, files: dict[str, str], tmp_path: Path
) -> None:
    """The guide's single data_format still applies to every file: a completion file read as
    instruction data stops the run at its first record, naming the file."""
    ft = _finetuner(tiny_model_dir, tmp_path, files, test_format="chat")
    try:
        with pytest.raises(DataError, match=r"val\.jsonl"):
            ft.prepare_data()
    finally:
        ft.close()
