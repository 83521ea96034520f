"""What only a CUDA machine can show: QLoRA's 4-bit base and bf16 mixed precision.

Skipped without CUDA (the development machine and CI have none). On a GPU machine:
``.venv/bin/pip install -e '.[qlora]' && .venv/bin/pytest tests/trainer/test_gpu.py -q``
(see docs/trainer.md, "What has not run on a GPU").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.quickstart import write_task_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(tiny_model_dir: Path, tmp_path: Path, **kw) -> FinetuningConfig:
    data = write_task_data(tmp_path / "data")
    return FinetuningConfig(
        model_name=str(tiny_model_dir),
        train_file=str(data["train"]),
        validation_file=str(data["validation"]),
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        progress_bar=False,
        **kw,
    )


def _assert_trained_adapter_loads(out: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 40, 50, 60]])).logits).all()


def test_qlora_trains_on_a_4bit_base_and_saves_a_loadable_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra")
    ft = ModelFinetuner(_config(tiny_model_dir, tmp_path, method="qlora", precision="bf16"))
    ft.load_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ft.model.modules()), "the base is not 4-bit"
    ft.train()
    assert ft.evaluate()["eval_loss"] > 0
    _assert_trained_adapter_loads(ft.save_model(), tiny_model_dir)


def test_lora_in_bf16_mixed_precision(tiny_model_dir: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    ft = ModelFinetuner(_config(tiny_model_dir, tmp_path, precision="auto"))
    ft.load_model()
    assert ft.precision == "bf16"  # auto picks bf16 on GPUs that have it
    metrics = ft.train()
    assert ft.trainer.args.bf16 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    _assert_trained_adapter_loads(ft.save_model(), tiny_model_dir)
