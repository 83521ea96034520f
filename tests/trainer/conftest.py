"""Fixtures shared by the trainer tests: one tiny model per session (built locally, no hub), and
short LoRA runs whose loss curves tests compare."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64) + 512-token BPE tokenizer with a chat template; read-only, shared."""
    from kubetune_trainer.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    """64 records of the quickstart's task (seed 3) as JSONL."""
    from kubetune_trainer.quickstart import make_task_records

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_task_records(64, seed=3)))
    return path


@pytest.fixture
def lora_losses(
    tiny_model_dir: Path, task_file: Path, tmp_path: Path
) -> Callable[..., tuple[list[float], Any]]:
    """``lora_losses(name, **config)``: train the tiny model with LoRA for 8 steps of 8 examples
    (seed 0, lr 3e-3, fp32 unless ``precision`` says otherwise) in ``tmp_path/name``; returns the
    logged losses and the closed finetuner."""
    from kubetune_trainer import FinetuningConfig, ModelFinetuner

    def run(name: str, **overrides: Any) -> tuple[list[float], Any]:
        settings: dict[str, Any] = {
            "model_name": str(tiny_model_dir),
            "output_dir": str(tmp_path / name),
            "train_file": str(task_file),
            "method": "lora",
            "max_steps": 8,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "progress_bar": False,
            "resume": "never",
            "seed": 0,
            "precision": "fp32",
        }
        ft = ModelFinetuner(FinetuningConfig(**(settings | overrides)))
        ft.load_model()
        ft.train()
        losses = [h["loss"] for h in ft.trainer.state.log_history if "loss" in h]
        ft.close()
        return losses, ft

    return run
