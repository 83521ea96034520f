"""fused_rotary: Llama's rotary embedding as one bf16 op on CPU, bit-identical to transformers'."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.glm import modeling_glm
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from kubetune_trainer import fused_rotary, kernels
from kubetune_trainer.fused_rotary import RotaryFunction, fusable, fuse_rotary
from tests.trainer.model_pairs import grad_pairs, step

needs_kernels = pytest.mark.skipif(
    not kernels.cpu_has_required_flags(), reason="kubetune's kernels need AVX-512 BF16 and AMX"
)


@pytest.fixture
def restore_rotary(monkeypatch):
    """Start from transformers' own functions (training in an earlier test may have switched them) and
    put back what was there after the test."""
    for modeling in (modeling_llama, modeling_qwen2):
        current = modeling.apply_rotary_pos_emb
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", getattr(current, fused_rotary._FUSED, current))


def _inputs(batch: int, tokens: int, heads: int, kv_heads: int, dim: int, cos_batch: int):
    # q and k in the projections' layout, [B, L, H, D] seen as [B, H, L, D], as attention makes them
    q = torch.randn(batch, tokens, heads, dim).bfloat16().transpose(1, 2)
    k = torch.randn(batch, tokens, kv_heads, dim).bfloat16().transpose(1, 2)
    angles = torch.randn(cos_batch, tokens, dim // 2) * 3
    angles = torch.cat([angles, angles], dim=-1)
    return q, k, angles.cos().bfloat16(), angles.sin().bfloat16()


def _strides(t: torch.Tensor) -> list[int]:
    return [stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1]  # size 1: any


@needs_kernels
@pytest.mark.parametrize(
    "shape",
    [(3, 50, 8, 4, 64, 3), (2, 33, 4, 2, 32, 1), (1, 5, 2, 1, 40, 1)],  # per-row cos; shared cos; half of 20
)
def test_bit_identical_to_transformers(shape: tuple[int, ...]) -> None:
    assert kernels.loaded()
    torch.manual_seed(sum(shape))
    q, k, cos, sin = _inputs(*shape)
    theirs_in = [t.clone().requires_grad_() for t in (q, k)]
    ours_in = [t.clone().requires_grad_() for t in (q, k)]
    transformers_rotary = getattr(modeling_llama.apply_rotary_pos_emb, fused_rotary._FUSED, None)
    transformers_rotary = transformers_rotary or modeling_llama.apply_rotary_pos_emb  # unfused
    theirs = transformers_rotary(*theirs_in, cos, sin)
    ours = RotaryFunction.apply(*ours_in, cos, sin)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert _strides(a) == _strides(b)  # the same memory layout as transformers' output
    grads = [torch.randn_like(t) for t in ours]
    torch.autograd.backward(list(theirs), grads)
    torch.autograd.backward(list(ours), grads)
    for a, b in zip(ours_in, theirs_in, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_only_llama_code_is_fused() -> None:
    assert fusable(modeling_llama) and fusable(modeling_qwen2)  # copies of the same code (fused or not)
    assert not fusable(modeling_glm)  # GLM rotates interleaved pairs: other arithmetic
    assert not fusable(torch.nn)  # no rotary at all


@needs_kernels
def test_a_bf16_model_trains_bit_identically(tiny_model_dir: Path, restore_rotary, monkeypatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    fused = copy.deepcopy(model)
    ids = torch.randint(3, 500, (2, 24))
    theirs = step(model, ids)
    assert fuse_rotary(fused) == 1  # modeling_llama
    assert fuse_rotary(fused) == 0  # idempotent
    calls = []
    original = RotaryFunction.apply
    monkeypatch.setattr(RotaryFunction, "apply", lambda *a: calls.append(1) or original(*a))
    assert torch.equal(step(fused, ids), theirs)
    assert len(calls) == model.config.num_hidden_layers  # every layer took the kernel
    for name, theirs_grad, ours_grad in grad_pairs(model, fused):
        assert torch.equal(ours_grad, theirs_grad), name


def test_other_dtypes_keep_transformers_code(tiny_model_dir: Path, restore_rotary, monkeypatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(3, 500, (2, 24))
    calls = []
    original = RotaryFunction.apply
    monkeypatch.setattr(RotaryFunction, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fuse_rotary(model)
        after = model(input_ids=ids).logits
    assert calls == []
    assert torch.equal(after, before)


@needs_kernels
@pytest.mark.parametrize(
    "case", ["plain", "other_head_dim", "other_length", "unsqueeze_2", "cos_grad", "fp32", "odd_dim"]
)
def test_inputs_the_op_does_not_cover_keep_transformers_code(case: str) -> None:
    q, k, cos, sin = _inputs(2, 6, 4, 2, 8, 1)
    dim = 1
    if case == "plain":
        assert fused_rotary._kernel_applies(q, k, cos, sin, dim)
        return
    if case == "other_head_dim":
        k = torch.randn(2, 2, 6, 4).bfloat16()
    elif case == "other_length":
        cos, sin = cos[:, :5], sin[:, :5]
    elif case == "unsqueeze_2":
        dim = 2
    elif case == "cos_grad":
        cos = cos.float().requires_grad_().bfloat16()
    elif case == "fp32":
        q, k = q.float(), k.float()
    elif case == "odd_dim":
        q, k, cos, sin = (t[..., :7] for t in (q, k, cos, sin))
    assert not fused_rotary._kernel_applies(q, k, cos, sin, dim)
