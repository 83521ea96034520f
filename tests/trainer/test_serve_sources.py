"""Adapter and model sources: what the server accepts, and the errors for what it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.serve import ModelServer, ServerConfig
from kubetune_trainer.serve.config import load_adapter_set
from kubetune_trainer.serve.sources import (
    SourceError,
    SourceNotFoundError,
    materialize,
    read_adapter_config,
)
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models

__all__ = ["serve_models"]


def adapter_dir(tmp_path: Path, **config) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


def test_lora_adapter_config_is_read(tmp_path: Path) -> None:
    info = read_adapter_config(
        adapter_dir(tmp_path, peft_type="LORA", r=8, base_model_name_or_path="/m"), "a"
    )
    assert (info.peft_type, info.rank, info.base_model) == ("LORA", 8, "/m")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING adapter; the built-in server serves LoRA adapters"),
        ({"peft_type": "LORA", "use_dora": True}, "DoRA adapter"),
        ({}, "unknown adapter"),
    ],
)
def test_adapters_that_cannot_share_a_batch_are_refused(tmp_path: Path, config: dict, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        read_adapter_config(adapter_dir(tmp_path, **config), "x")


def test_a_model_directory_is_not_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=r"no adapter_config\.json.*serve it as the base model"):
        read_adapter_config(tmp_path, "x")


def test_sources_that_do_not_exist(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="no directory at"):
        materialize(str(tmp_path / "missing"), "adapter x", download_dir=tmp_path)
    with pytest.raises(SourceError, match="unsupported scheme"):
        materialize("gs://bucket/x", "adapter x", download_dir=tmp_path)
    assert materialize(f"file://{tmp_path}", "adapter x", download_dir=tmp_path) == tmp_path


def test_adapter_set_file(tmp_path: Path) -> None:
    f = tmp_path / "set.json"
    f.write_text(json.dumps({"adapters": [{"name": "a", "uri": "s3://b/a"}, {"name": "b", "uri": "/x"}]}))
    assert load_adapter_set(f) == {"a": "s3://b/a", "b": "/x"}
    f.write_text(json.dumps({"adapters": [{"name": "a", "uri": "x"}, {"name": "a", "uri": "y"}]}))
    with pytest.raises(ValueError, match="listed twice"):
        load_adapter_set(f)


def test_config_rejects_reserved_and_clashing_names() -> None:
    with pytest.raises(ValueError, match="'__base__' is not valid"):
        ServerConfig.validated({"adapters": {"__base__": "/x"}})
    with pytest.raises(ValueError, match="reserved"):
        ServerConfig.validated({"base_model": "/m", "base_model_name": "__base__"})
    with pytest.raises(ValueError, match="base model's name"):
        ServerConfig.validated({"base_model": "/m", "base_model_name": "a", "adapters": {"a": "/x"}})


def test_an_adapter_for_another_base_model_is_refused_and_nothing_breaks(
    serve_models: ServeModels, tmp_path: Path
) -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other-base", hidden_size=32, num_heads=4, num_kv_heads=2)
    foreign = tmp_path / "foreign"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(other),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM),
    ).save_pretrained(foreign)

    server = ModelServer(
        base_model=str(serve_models.base), adapters={"red": str(serve_models.adapters["red"])}
    )
    server.load()
    try:
        with pytest.raises(SourceError, match=r"trained for a different base model"):
            server.load_adapter("foreign", str(foreign))
        assert server.model_names() == [serve_models.base.name, "red"]
        assert server.generate("the cat ->", model="red", max_tokens=12) == PHRASES["red"]
    finally:
        server.close()
