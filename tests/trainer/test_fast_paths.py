"""fast_paths: the same numbers with less work (no casts autocast undoes, no mask for right padding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kubetune_trainer.fast_paths import (
    drop_padding_mask,
    is_right_padding,
    padding_mask_droppable,
    skip_input_casts_under_autocast,
)
from kubetune_trainer.packed_attention import register


def test_right_padding_is_recognised_and_nothing_else() -> None:
    assert is_right_padding(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not is_right_padding(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding
    assert not is_right_padding(torch.tensor([[1, 0, 1]]))  # a hole
    assert not is_right_padding(torch.tensor([[0, 0, 0]]))  # an empty row
    assert not is_right_padding(torch.ones(2, 3, 3))  # not a 2-D padding mask
    batch = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    assert set(drop_padding_mask(batch)) == {"input_ids"}
    left = {"input_ids": torch.zeros(1, 3), "attention_mask": torch.tensor([[0, 1, 1]])}
    assert drop_padding_mask(left) is left


def _lora(model_dir: Path, attention: str, dtype: torch.dtype = torch.float32):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    return model


@pytest.mark.parametrize("attention", ["sdpa", "packed_sdpa"])
def test_a_right_padded_batch_trains_the_same_without_its_mask(tiny_model_dir: Path, attention: str) -> None:
    if attention == "packed_sdpa":
        register()
    model = _lora(tiny_model_dir, attention)
    assert padding_mask_droppable(model, "lora", trust_remote_code=False)
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_mask = model(**batch)
    without = model(**drop_padding_mask(batch))
    torch.testing.assert_close(without.loss, with_mask.loss, rtol=1e-5, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(without.logits[real], with_mask.logits[real], rtol=1e-4, atol=1e-5)
    # The gradients the adapter gets are the same too.
    with_mask.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(**drop_padding_mask(batch)).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_which_models_keep_their_mask(tiny_model_dir: Path) -> None:
    eager = _lora(tiny_model_dir, "eager")
    assert not padding_mask_droppable(eager, "lora", trust_remote_code=False)  # eager builds the mask anyway
    sdpa = _lora(tiny_model_dir, "sdpa")
    assert not padding_mask_droppable(sdpa, "lora", trust_remote_code=True)
    for method in ("prefix", "prompt", "ptuning"):
        assert not padding_mask_droppable(sdpa, method, trust_remote_code=False)
    assert padding_mask_droppable(sdpa, "full", trust_remote_code=False)


def test_lora_skips_only_the_casts_autocast_undoes(tiny_model_dir: Path) -> None:
    model = _lora(tiny_model_dir, "sdpa", dtype=torch.bfloat16)  # bf16 base, fp32 adapter weights
    ids = torch.randint(3, 500, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    assert skip_input_casts_under_autocast(model) > 0
    assert skip_input_casts_under_autocast(model) == 0  # hooked once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)  # bf16 -> fp32 -> bf16 is exact: the same bits
    lora_layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)
    # Outside autocast (generation, a merge) PEFT casts again, so mixed dtypes still work.
    plain = model(input_ids=ids).logits
    assert plain.shape == after.shape
    assert all(m.cast_input_dtype_enabled for m in lora_layers)
