"""fused_mlp: Llama's SwiGLU as one bf16 op on CPU, bit-identical to torch's op-by-op version."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from kubetune_trainer import kernels
from kubetune_trainer.fused_mlp import SwiGLUFunction, fusable, fuse_swiglu_mlps
from tests.trainer.model_pairs import grad_pairs, step

needs_kernels = pytest.mark.skipif(
    not kernels.cpu_has_required_flags(), reason="kubetune's kernels need AVX-512 BF16 and AMX"
)


def _mlp_config(act: str = "silu") -> dict:
    return {"hidden_size": 32, "intermediate_size": 88, "hidden_act": act}


def test_only_llama_code_mlps_with_silu_are_fused() -> None:
    assert fusable(LlamaMLP(LlamaConfig(**_mlp_config())))
    assert fusable(Qwen2MLP(Qwen2Config(**_mlp_config())))  # a copy of the same code
    assert not fusable(LlamaMLP(LlamaConfig(**_mlp_config("gelu"))))  # another activation
    from transformers.models.gemma.configuration_gemma import GemmaConfig

    assert not fusable(GemmaMLP(GemmaConfig(**_mlp_config("gelu_pytorch_tanh"))))
    assert not fusable(torch.nn.Linear(4, 4))


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 40, 2048), (5, 7, 88), (1, 1, 3)])  # 88, 3: rows end mid-vector
def test_bit_identical_to_torch(shape: tuple[int, ...]) -> None:
    assert kernels.loaded()
    torch.manual_seed(sum(shape))
    gate = (torch.randn(shape) * 4).bfloat16()  # wide enough to reach silu's saturated tails
    up = torch.randn(shape).bfloat16()
    grad = torch.randn(shape).bfloat16()
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    theirs = torch.nn.functional.silu(g1) * u1
    ours = SwiGLUFunction.apply(g2, u2)
    assert torch.equal(ours, theirs)
    theirs.backward(grad)
    ours.backward(grad)
    assert torch.equal(g2.grad, g1.grad)
    assert torch.equal(u2.grad, u1.grad)


@needs_kernels
def test_a_bf16_model_trains_bit_identically(tiny_model_dir: Path, monkeypatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    fused = copy.deepcopy(model)
    assert fuse_swiglu_mlps(fused) == model.config.num_hidden_layers
    assert fuse_swiglu_mlps(fused) == 0  # idempotent
    calls = []
    original = SwiGLUFunction.apply
    monkeypatch.setattr(SwiGLUFunction, "apply", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(3, 500, (2, 24))
    theirs = step(model, ids)
    assert calls == []
    assert torch.equal(step(fused, ids), theirs)
    assert len(calls) == model.config.num_hidden_layers  # the fused model did take the kernel
    for name, theirs_grad, ours_grad in grad_pairs(model, fused):
        assert torch.equal(ours_grad, theirs_grad), name


def test_fp32_keeps_torch_code(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fused = copy.deepcopy(model)
    fuse_swiglu_mlps(fused)
    ids = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, model(input_ids=ids).logits)
