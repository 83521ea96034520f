"""evaluate() and test() at any time: a baseline after load_model(), after train(), on a saved model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.quickstart import make_task_records


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's model: std 0.1 init, with which the code-word task is learned in few steps."""
    from kubetune_trainer.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), initializer_range=0.1)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("codewords")
    rows = make_task_records(160, seed=2)
    return {
        "train": _write(d / "train.jsonl", rows[:128]),
        "validation": _write(d / "val.jsonl", rows[128:144]),
        "test": _write(d / "test.jsonl", rows[144:]),
    }


def _config(model: Path, out: Path, **kw) -> FinetuningConfig:
    base = {
        "model_name": str(model),
        "output_dir": str(out),
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "max_steps": 40,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "packing": False,
        "metrics": ["perplexity", "exact_match", "token_f1"],
        "eval_max_examples": 4,
        "eval_max_new_tokens": 8,
        "logging_steps": 10,
        "progress_bar": False,
        "resume": "never",
        "seed": 0,
        "precision": "fp32",  # the same numbers from every load path, on any machine
    }
    return FinetuningConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def before_and_after(tiny_model_dir: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The quickstart's story on a small scale: evaluate and test, train, evaluate and test again."""
    out = tmp_path_factory.mktemp("adapter")
    cfg = _config(
        tiny_model_dir, out, train_file=str(files["train"]), validation_file=str(files["validation"])
    )
    rows = [json.loads(line) for line in files["test"].read_text().splitlines()]
    ft = ModelFinetuner(cfg)
    ft.load_model()
    before = ft.evaluate()
    before_test = ft.test(rows)
    try:
        ft.train()
    finally:
        ft.close()
    after = ft.evaluate()
    after_test = ft.test(rows)
    ft.save_model()
    return {
        "ft": ft,
        "out": out,
        "rows": rows,
        "before": before,
        "before_test": before_test,
        "after": after,
        "after_test": after_test,
    }


def test_baseline_evaluate_after_load_model(before_and_after) -> None:
    before = before_and_after["before"]
    assert set(before) >= {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_token_f1"}
    assert math.isclose(before["eval_perplexity"], math.exp(before["eval_loss"]), rel_tol=1e-6)
    # A random model on a 512-token vocabulary: loss near ln(512) ~ 6.2, nothing right.
    assert 3.0 < before["eval_loss"] < 10.0
    assert before["eval_exact_match"] == 0.0
    assert before_and_after["before_test"]["test_loss"] > 3.0


def test_training_lowers_validation_and_test_loss(before_and_after) -> None:
    before, after = before_and_after["before"], before_and_after["after"]
    assert after["eval_loss"] < before["eval_loss"] - 1.0, (before["eval_loss"], after["eval_loss"])
    assert before_and_after["after_test"]["test_loss"] < before_and_after["before_test"]["test_loss"] - 1.0


def test_evaluate_and_test_after_load_finetuned_model(before_and_after, tiny_model_dir, files) -> None:
    # Only the model and the evaluation data: the training file is never read. The same loss as the
    # trainer's own evaluation after train(): the validation set is built the same way.
    cfg = FinetuningConfig(
        model_name=str(tiny_model_dir),
        train_file="not-read.jsonl",
        validation_file=str(files["validation"]),
        # As in training: the eval batch size and the seed decide the batches (length-grouped), and
        # the loss is a mean over batches.
        precision="fp32",
        per_device_train_batch_size=8,
        seed=0,
        metrics=["perplexity", "exact_match", "token_f1"],
        eval_max_examples=4,
        eval_max_new_tokens=8,
        progress_bar=False,
    )
    fresh = ModelFinetuner(cfg)
    fresh.load_finetuned_model(before_and_after["out"])
    metrics = fresh.evaluate()
    assert metrics["eval_loss"] == pytest.approx(before_and_after["after"]["eval_loss"], rel=1e-4)
    assert metrics["eval_exact_match"] == pytest.approx(before_and_after["after"]["eval_exact_match"])
    test = fresh.test(before_and_after["rows"])
    assert test["test_loss"] == pytest.approx(before_and_after["after_test"]["test_loss"], rel=1e-4)


def test_baseline_with_validation_split_matches_training(tiny_model_dir, files, tmp_path) -> None:
    cfg = _config(
        tiny_model_dir, tmp_path, train_file=str(files["train"]), validation_split=0.125, max_steps=2
    )
    ft = ModelFinetuner(cfg)
    ft.load_model()
    before = ft.evaluate()
    held_out = [ex.key for ex in ft.data.validation.examples]
    assert before["eval_loss"] > 3.0 and len(held_out) > 0
    ft.train()
    ft.close()
    # train() held out exactly the examples the baseline measured.
    assert [ex.key for ex in ft.data.validation.examples] == held_out
    assert ft.evaluate()["eval_loss"] < before["eval_loss"]


def test_evaluate_without_validation_data_says_what_to_set(tiny_model_dir, files, tmp_path) -> None:
    ft = ModelFinetuner(_config(tiny_model_dir, tmp_path, train_file=str(files["train"])))
    ft.load_model()
    with pytest.raises(ConfigError, match="set validation_file or validation_split"):
        ft.evaluate()
    assert ft.test(str(files["test"]))["test_loss"] > 3.0
