"""Fixtures shared by the trainer tests: one tiny model per session (built locally, no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64) + 512-token BPE tokenizer with a chat template; read-only, shared."""
    from kubetune_trainer.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
