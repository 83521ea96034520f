"""fused_lora: PEFT's LoRA layers as one autograd function compute the same outputs and gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kubetune_trainer.fused_lora import LoraLinearFunction, fusable, fuse_lora_layers


def _pair(model_dir: Path, dtype: torch.dtype, dropout: float = 0.0, **lora: object):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False, **lora
    )
    peft = get_peft_model(base, config)
    fused = copy.deepcopy(peft)
    return peft, fused


def _step(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(7)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.float(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_matches_peft(tiny_model_dir: Path, dropout: float) -> None:
    peft, fused = _pair(tiny_model_dir, torch.float32, dropout=dropout)
    assert fuse_lora_layers(fused) > 0
    assert fuse_lora_layers(fused) == 0  # idempotent
    ids = torch.randint(3, 500, (2, 30))
    logits_p, grads_p = _step(peft.train(), ids, autocast=False)
    logits_f, grads_f = _step(fused.train(), ids, autocast=False)
    torch.testing.assert_close(logits_f, logits_p, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_p.keys() and len(grads_p) > 0
    for name, grad in grads_p.items():
        assert grads_f[name].dtype == grad.dtype == torch.float32
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_model_dir: Path) -> None:
    """Under autocast both round to bf16 in different places: compare each with an fp32 run."""
    reference, _ = _pair(tiny_model_dir, torch.float32)
    peft, fused = _pair(tiny_model_dir, torch.bfloat16)
    for model in (peft, fused):  # PEFT keeps adapter weights in fp32 on a bf16 base
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    fuse_lora_layers(fused)
    ids = torch.randint(3, 500, (4, 48))
    logits_r, grads_r = _step(reference, ids, autocast=False)
    logits_p, grads_p = _step(peft, ids, autocast=True)
    logits_f, grads_f = _step(fused, ids, autocast=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(logits_f, logits_r) <= 1.5 * rel(logits_p, logits_r) + 1e-3
    for name, grad in grads_r.items():
        assert grads_f[name].dtype == torch.float32
        assert rel(grads_f[name], grad) <= 1.5 * rel(grads_p[name], grad) + 1e-3, name


def test_unusual_calls_fall_back_to_peft(tiny_model_dir: Path) -> None:
    peft, fused = _pair(tiny_model_dir, torch.float32)
    fuse_lora_layers(fused)
    ids = torch.randint(3, 500, (1, 12))
    calls = 0
    original = LoraLinearFunction.apply

    def counting(*args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(*args)

    LoraLinearFunction.apply = counting  # type: ignore[method-assign]
    try:
        with fused.disable_adapter(), torch.no_grad():  # adapters off: the base model's output
            off = fused(input_ids=ids).logits
        assert calls == 0
        with torch.no_grad():
            on = fused(input_ids=ids).logits
        assert calls > 0
    finally:
        LoraLinearFunction.apply = original  # type: ignore[method-assign]
    with peft.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(off, peft(input_ids=ids).logits)
    with torch.no_grad():
        torch.testing.assert_close(on, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_only_plain_lora_over_linear_is_fused(tiny_model_dir: Path) -> None:
    _, dora = _pair(tiny_model_dir, torch.float32, use_dora=True)
    assert not any(fusable(m) for m in dora.modules())  # DoRA has its own forward
    _, plain = _pair(tiny_model_dir, torch.float32)
    assert any(fusable(m) for m in plain.modules())
    assert not fusable(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_recomputes_the_same(tiny_model_dir: Path, reentrant: bool) -> None:
    from kubetune_trainer.fused_norm import fuse_rms_norms

    peft, fused = _pair(tiny_model_dir, torch.float32)
    fuse_lora_layers(fused)
    fuse_rms_norms(fused)
    for model in (peft, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()  # what the Trainer does for PEFT models with reentrant checkpointing
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    ids = torch.randint(3, 500, (2, 30))
    _, grads_p = _step(peft.train(), ids, autocast=False)
    _, grads_f = _step(fused.train(), ids, autocast=False)
    assert len(grads_p) > 0
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)
