"""kubetune's own CPU kernels, compiled once per torch version and loaded as torch ops.

- ``torch.ops.kubetune.causal_attention_backward``: the backward of causal self-attention in bf16
  on CPUs with AMX (causal_attention_backward.cpp says how). :class:`CausalAttention` pairs it
  with torch's own CPU flash-attention forward.
- ``torch.ops.kubetune.rms_norm_forward`` / ``rms_norm_backward``: Llama's RMSNorm in bf16, one
  pass each way (rms_norm.cpp; fused_norm.py uses them).
- ``torch.ops.kubetune.swiglu_forward`` / ``swiglu_backward``: Llama's ``silu(gate) * up`` in bf16,
  one pass each way (swiglu.cpp; fused_mlp.py uses them).
- ``torch.ops.kubetune.rotary_forward`` / ``rotary_backward``: Llama's rotary position embedding
  in bf16, one pass each way (rotary.cpp; fused_rotary.py uses them).

The library is built with torch's C++ extension builder (a C++ compiler and ninja, which
DeepSpeed's JIT ops need as well) and named after the torch version and a hash of the sources
and flags. A built library is loaded from ``$KUBETUNE_KERNELS_DIR`` (the trainer image builds it
there when the image is built) or ``~/.cache/kubetune/kernels``; otherwise it is built into the
first of those that is writable (once, about 30 s on 2 cores). Where anything is missing (no
AVX-512 BF16 or AMX, no compiler, a failed build), :func:`loaded` is False, one warning is
logged and training keeps torch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("causal_attention_backward.cpp", "rms_norm.cpp", "swiglu.cpp", "rotary.cpp")
]
#: Included by the sources: part of the library's hash, not compiled on their own.
HEADERS = [Path(__file__).with_name("bf16_vec.h")]
#: The instruction sets the source is compiled for (the AVX-512 vector code beside the AMX calls), and
#: OpenMP: without it ATen's ``parallel_for`` (a header template) runs every kernel on one thread.
CFLAGS = ["-O3", "-fopenmp", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c"]  # fmt: skip
#: libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP thread pool.
LDFLAGS = ["-fopenmp"]
#: /proc/cpuinfo flags the kernel needs at run time.
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile")
ENV_DIR = "KUBETUNE_KERNELS_DIR"


def library_name() -> str:
    """Versioned by the source and torch: a changed kernel or torch never loads a stale build."""
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(CFLAGS + LDFLAGS).encode()
    ).hexdigest()[:12]
    torch_version = torch.__version__.replace("+", "_").replace(".", "_")
    return f"kubetune_kernels_{torch_version}_{digest}"


def build_dirs() -> list[Path]:
    """Where a built library is looked for, in order; the first writable one is built into."""
    home = Path.home() / ".cache" / "kubetune" / "kernels"
    configured = os.environ.get(ENV_DIR)
    return [Path(configured), home] if configured else [home]


def cpu_has_required_flags(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return set(REQUIRED_CPU_FLAGS) <= set(flags)


def build(directory: Path | None = None, load: bool = True) -> Path:
    """Compile the kernels (if not built yet) into ``directory``; returns the library's path."""
    from torch.utils.cpp_extension import load as build_and_load

    name = library_name()
    dirs = [directory] if directory else build_dirs()
    for base in dirs:
        library = base / name / f"{name}.so"
        if library.exists():  # built before (in the image, or by an earlier run): no compiler needed
            if load:
                torch.ops.load_library(str(library))
            return library
    out = next((d / name for d in dirs if _writable(d)), None)
    if out is None:
        raise OSError(f"none of {', '.join(map(str, dirs))} is writable")
    out.mkdir(parents=True, exist_ok=True)
    build_and_load(
        name=name, sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(out), is_python_module=False,
        verbose=False,
    )  # fmt: skip
    return out / f"{name}.so"


def _writable(directory: Path) -> bool:
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    return existing is not None and os.access(existing, os.W_OK)


@functools.cache
def loaded() -> bool:
    """Whether kubetune's kernels are loaded (building them if needed) and this CPU can run them."""
    if not cpu_has_required_flags():
        return False
    try:
        build()
        if not torch.ops.kubetune.causal_attention_backward_supported():
            log.warning("kubetune's CPU kernels: torch's oneDNN has no AMX bf16 micro-kernel; using torch's")
            return False
    except Exception as exc:
        log.warning("kubetune's CPU kernels could not be built (%s); using torch's", exc)
        return False
    return True


def applies(*tensors: torch.Tensor) -> bool:
    """Whether kubetune's bf16 CPU kernels can take these tensors: all bf16 on the CPU, library loaded."""
    return all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors) and loaded()


def causal_attention_backward_op() -> Any | None:
    """``torch.ops.kubetune.causal_attention_backward`` where this CPU and build can run it, else None."""
    return torch.ops.kubetune.causal_attention_backward if loaded() else None


class FlashForward(torch.autograd.Function):
    """torch's CPU flash-attention forward, causal, saving what a backward needs; subclasses
    choose the backward (:class:`CausalAttention` here, ``packed_attention.CausalFlashFp32Backward``)."""

    @staticmethod
    def forward(
        ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> Any:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, scale=scale
        )[:2]
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        return out


class CausalAttention(FlashForward):
    """Causal self-attention: torch's CPU flash-attention forward, kubetune's backward.

    Inputs ``[batch, heads, tokens, head_dim]`` in bf16 (keys and values may have fewer heads:
    GQA); returns the output in the same layout.
    """

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        query, key, value, out, lse = ctx.saved_tensors
        op = causal_attention_backward_op()
        assert op is not None, "CausalAttention is only applied where the kernel loaded"
        scale = query.shape[-1] ** -0.5 if ctx.scale is None else ctx.scale
        dq, dk, dv = op(grad, query, key, value, out, lse, scale)
        return dq, dk, dv, None
