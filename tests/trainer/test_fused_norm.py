"""fused_norm: Llama-style RMSNorm as one autograd function, the same output and gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from kubetune_trainer import fused_norm as fn
from kubetune_trainer import kernels
from kubetune_trainer.fused_norm import RMSNormFunction, fusable, fuse_rms_norms
from tests.trainer.model_pairs import grad_pairs, step


def _within_one_bf16_step(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2**-7, atol=1e-6)
    assert (ours == theirs).float().mean() > 0.98  # most elements round the same way


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_and_gradients_as_transformers(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = torch.randn(3, 10, 64, dtype=dtype) * 3
    grad = torch.randn(3, 10, 64, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = norm(x1)
    ours = RMSNormFunction.apply(x2, norm.weight, norm.variance_epsilon)
    if dtype == torch.bfloat16 and kernels.loaded():
        # kubetune's C++ norm: the same roundings, another order for the sum of squares
        _within_one_bf16_step(ours, theirs)
    else:
        assert torch.equal(ours, theirs)  # the forward is transformers' arithmetic, op for op
    theirs.backward(grad)
    weight_grad = norm.weight.grad.clone()
    norm.weight.grad = None
    ours.backward(grad)
    torch.testing.assert_close(x2, x)  # the input is not changed in place
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, weight_grad, **tol)  # full fine-tuning trains it


def test_only_llama_code_norms_are_fused() -> None:
    assert fusable(LlamaRMSNorm(8)) and fusable(Qwen2RMSNorm(8))  # copies of the same code
    assert not fusable(GemmaRMSNorm(8))  # (1 + weight): different arithmetic
    assert not fusable(torch.nn.LayerNorm(8))


def test_a_model_trains_the_same(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fused = copy.deepcopy(model)
    assert fuse_rms_norms(fused) > 0
    assert fuse_rms_norms(fused) == 0  # idempotent
    ids = torch.randint(3, 500, (2, 24))
    torch.testing.assert_close(step(fused, ids), step(model, ids))
    for name, theirs, ours in grad_pairs(model, fused):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(
    not kernels.cpu_has_required_flags(), reason="kubetune's kernels need AVX-512 BF16 and AMX"
)
@pytest.mark.parametrize("hidden", [768, 72])  # 72: a row that ends mid-vector
def test_the_cpp_norm_matches_the_tensor_code(monkeypatch, hidden: int) -> None:
    assert kernels.loaded()
    torch.manual_seed(hidden)
    weight = (torch.randn(hidden) * 0.2 + 1).bfloat16()
    x = (torch.randn(4, 33, hidden) * 3).bfloat16()
    grad = torch.randn(4, 33, hidden).bfloat16()
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(fn, "_kernel_applies", lambda x, w, use=use_kernel: use)
        xi = x.clone().requires_grad_()
        y = RMSNormFunction.apply(xi, weight, 1e-5)
        y.backward(grad)
        results.append((y, xi.grad))
    (y_cpp, dx_cpp), (y_ref, dx_ref) = results
    _within_one_bf16_step(y_cpp, y_ref)
    torch.testing.assert_close(dx_cpp.float(), dx_ref.float(), rtol=2e-2, atol=2e-2)
    # against fp64, the C++ gradient is as good as the tensor code's
    xd = x.double().requires_grad_()
    (weight.double() * (xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-5))).backward(grad.double())
    err_cpp, err_ref = ((d.double() - xd.grad).norm() for d in (dx_cpp, dx_ref))
    assert err_cpp <= 1.1 * err_ref + 1e-6
