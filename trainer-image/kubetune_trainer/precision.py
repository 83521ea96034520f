"""What ``precision: auto`` (training) and ``dtype: auto`` (the built-in server) resolve to.

One rule for both, so a model is served in the precision it was trained in on the same hardware:

- CUDA: bf16 where the GPU supports it, fp16 on older GPUs;
- CPU: bf16 where the CPU computes it natively (AMX or AVX-512 BF16: oneDNN runs bf16 matmuls
  on those units at several times the fp32 rate), fp32 elsewhere (bf16 would be emulated and slower);
- anything else (MPS): fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

AutoPrecision = Literal["bf16", "fp16", "fp32"]

#: /proc/cpuinfo flags of the CPU features that compute bf16 natively.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# torch's own CPU capability probes (torch.cpu._is_*_supported, torch >= 2.3), per flag above.
_TORCH_PROBES = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_bf16_features() -> frozenset[str]:
    """Which of :data:`NATIVE_BF16_FLAGS` this CPU has (and the OS lets processes use).

    torch's own probes (cpuinfo, plus the OS permission AMX needs) where the installed torch has
    them; /proc/cpuinfo flags otherwise.
    """
    import torch

    cpu = getattr(torch, "cpu", None)
    probes = {flag: getattr(cpu, name, None) for flag, name in _TORCH_PROBES.items()}
    if all(callable(p) for p in probes.values()):
        found = set()
        for flag, probe in probes.items():
            try:
                if probe():  # type: ignore[misc]
                    found.add(flag)
            except Exception:  # a probe that cannot run means: not usable
                pass
        return frozenset(found)
    return frozenset(_cpuinfo_flags() & set(NATIVE_BF16_FLAGS))


def cpu_computes_bf16() -> bool:
    return bool(cpu_bf16_features())


def auto_precision(device_type: str) -> AutoPrecision:
    """The precision ``auto`` means on a device of this type (``cuda``, ``cpu``, ``mps``)."""
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu":
        return "bf16" if cpu_computes_bf16() else "fp32"
    return "fp32"
