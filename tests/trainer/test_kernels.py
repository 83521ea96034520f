"""kubetune's CPU attention kernel: gradients as accurate as torch's, taken where it applies,
loaded without a compiler once built, and a training run's loss curve unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubetune_trainer import kernels
from kubetune_trainer import packed_attention as pa

needs_kernel = pytest.mark.skipif(
    not kernels.cpu_has_required_flags(), reason="the kernel needs AVX-512 and AMX (Sapphire Rapids or newer)"
)


@needs_kernel
def test_the_kernel_loads_on_a_cpu_with_amx():
    assert kernels.causal_attention_backward_op() is not None


@needs_kernel
def test_the_kernels_run_on_torchs_threads():
    """ATen's parallel_for is a header template: built without OpenMP it runs every kernel on one
    thread (it did, until the flags said -fopenmp). Built with it, the library calls libgomp, and
    its libgomp.so.1 is the copy torch loaded, not a second runtime from the system. (Other
    packages, scikit-learn for one, bundle their own under a renamed soname: not counted.)"""
    assert kernels.loaded()
    library = kernels.build(load=False)
    assert b"GOMP_parallel" in library.read_bytes()
    maps = Path("/proc/self/maps").read_text()
    gomp = {line.split()[-1] for line in maps.splitlines() if line.split()[-1].endswith("/libgomp.so.1")}
    assert len(gomp) == 1 and "torch" in next(iter(gomp)), gomp


def _inputs(batch: int, tokens: int, heads: int, kv_heads: int, head_dim: int, layout: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def make(h: int, scale: float) -> torch.Tensor:
        if layout == "transformers":  # [batch, tokens, heads, dim] memory seen as [batch, heads, tokens, dim]
            t = torch.randn(batch, tokens, h, head_dim, generator=g).mul(scale).bfloat16().transpose(1, 2)
        else:
            t = torch.randn(batch, h, tokens, head_dim, generator=g).mul(scale).bfloat16()
        return t.requires_grad_()

    q, k, v = make(heads, 1.5), make(kv_heads, 1.5), make(kv_heads, 1.0)
    grad = torch.randn(batch, heads, tokens, head_dim, generator=g).bfloat16()
    return q, k, v, grad


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 2, 7, 128, 129, 300])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 32), (2, 2, 64), (6, 2, 16)])
@pytest.mark.parametrize("layout", ["transformers", "contiguous"])
def test_gradients_are_as_close_to_fp64_as_torchs(tokens, heads, kv_heads, head_dim, layout):
    q, k, v, grad = _inputs(2, tokens, heads, kv_heads, head_dim, layout, seed=tokens + head_dim)
    out = kernels.CausalAttention.apply(q, k, v, None)
    out.backward(grad)
    ours = [t.grad for t in (q, k, v)]
    # torch's flash kernel in bf16, forward and backward: the same forward, the backward replaced
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    theirs_out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True)
    assert torch.equal(out, theirs_out)
    theirs_out.backward(grad)
    q3, k3, v3 = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q3, k3, v3, is_causal=True, enable_gqa=True).backward(grad.double())
    for mine, theirs, exact in zip(
        ours, (q2.grad, k2.grad, v2.grad), (q3.grad, k3.grad, v3.grad), strict=True
    ):
        assert mine.dtype == torch.bfloat16 and mine.shape == exact.shape
        assert mine.isfinite().all()
        err, torch_err = (mine.double() - exact).norm(), (theirs.double() - exact).norm()
        assert err <= 1.1 * torch_err + 1e-3 * (exact.norm() + 1), (err, torch_err, exact.norm())


@needs_kernel
@pytest.mark.parametrize("case", ["plain", "no_grad", "mask", "fp32", "dropout"])
def test_training_attention_takes_the_kernel_only_where_it_computes_the_same(monkeypatch, case):
    calls = []
    original = kernels.CausalAttention.apply
    monkeypatch.setattr(kernels.CausalAttention, "apply", lambda *a: calls.append(1) or original(*a))

    class Attention(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    q, k, v, _ = _inputs(2, 40, 4, 2, 32, "transformers")
    if case == "fp32":
        q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril() if case == "mask" else None
    with torch.set_grad_enabled(case != "no_grad"):
        out, _ = pa.packed_sdpa_forward(
            Attention(), q, k, v, mask, dropout=0.1 if case == "dropout" else 0.0, scaling=32**-0.5
        )
    assert calls == ([1] if case == "plain" else [])
    assert out.shape == (2, 40, 4, 32)  # [batch, tokens, heads, head_dim], like transformers' sdpa


def test_a_built_library_loads_without_building(tmp_path: Path, monkeypatch):
    name = kernels.library_name()
    prebuilt = tmp_path / "image" / name / f"{name}.so"
    prebuilt.parent.mkdir(parents=True)
    prebuilt.write_bytes(b"")  # only its presence matters: not loaded here
    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path / "image"))

    def no_compiler(**_: object) -> None:
        raise AssertionError("a built library must not be built again")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    assert kernels.build(load=False) == prebuilt
    assert kernels.build_dirs()[0] == tmp_path / "image"


def test_the_library_name_follows_the_source_and_torch(tmp_path: Path, monkeypatch):
    before = kernels.library_name()
    assert torch.__version__.split("+")[0].replace(".", "_") in before
    source = tmp_path / "k.cpp"
    shutil.copy(kernels.SOURCES[0], source)
    source.write_text(source.read_text() + "\n// changed\n")
    monkeypatch.setattr(kernels, "SOURCES", [source, *kernels.SOURCES[1:]])
    assert kernels.library_name() != before
    monkeypatch.undo()
    header = tmp_path / "h.h"  # a header the sources include counts too
    header.write_text(kernels.HEADERS[0].read_text() + "\n// changed\n")
    monkeypatch.setattr(kernels, "HEADERS", [header])
    assert kernels.library_name() != before


@needs_kernel
def test_a_bf16_training_run_keeps_its_loss_curve(lora_losses, monkeypatch):
    calls = []
    original = kernels.CausalAttention.apply
    monkeypatch.setattr(kernels.CausalAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ours, _ = lora_losses("kernel", precision="bf16")
    assert calls, "the bf16 CPU run did not use the kernel"
    monkeypatch.setattr(pa, "_own_kernel_applies", lambda query: False)
    calls.clear()
    torchs, _ = lora_losses("torch", precision="bf16")
    assert not calls
    assert len(ours) == len(torchs) == 8
    assert ours[-1] < ours[0]  # it learns, so equal curves are not two flat lines
    # The same data, order and seed; bf16 rounding differs between the two backward kernels.
    assert ours == pytest.approx(torchs, rel=2e-2, abs=2e-2)
