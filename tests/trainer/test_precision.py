"""precision: auto (training) and dtype: auto (the server) — one rule, bf16 on CPUs that compute it natively."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer import precision as prec
from kubetune_trainer.methods import resolve_precision
from kubetune_trainer.quickstart import make_task_records
from kubetune_trainer.serve.model import resolve_dtype


def _cfg(**kw) -> FinetuningConfig:
    return FinetuningConfig(model_name="m", train_file="t.jsonl", **kw)


@pytest.fixture
def cpu_features(monkeypatch: pytest.MonkeyPatch):
    """Set what the CPU capability probe reports."""

    def set_features(*flags: str) -> None:
        monkeypatch.setattr(prec, "cpu_bf16_features", lambda: frozenset(flags))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return set_features


@pytest.mark.parametrize("flags", [("amx_bf16",), ("avx512_bf16",), ("amx_bf16", "avx512_bf16")])
def test_auto_is_bf16_on_cpus_with_native_bf16(cpu_features, flags) -> None:
    cpu_features(*flags)
    assert resolve_precision(_cfg()) == "bf16"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_auto_is_fp32_on_other_cpus(cpu_features) -> None:
    cpu_features()
    assert resolve_precision(_cfg()) == "fp32"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    # Explicit settings are kept whatever the CPU has.
    assert resolve_precision(_cfg(precision="bf16")) == "bf16"
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


@pytest.mark.parametrize(("gpu_bf16", "expected"), [(True, "bf16"), (False, "fp16")])
@pytest.mark.parametrize("cpu_flags", [(), ("amx_bf16", "avx512_bf16")])
def test_auto_on_cuda_is_unchanged(monkeypatch: pytest.MonkeyPatch, gpu_bf16, expected, cpu_flags) -> None:
    monkeypatch.setattr(prec, "cpu_bf16_features", lambda: frozenset(cpu_flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert resolve_precision(_cfg()) == expected
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    assert resolve_dtype("auto", torch.device("cuda")) == dtypes[expected]


@pytest.fixture
def fresh_probe():
    prec.cpu_bf16_features.cache_clear()
    yield prec.cpu_bf16_features
    prec.cpu_bf16_features.cache_clear()


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, True, {"amx_bf16", "avx512_bf16"}), (False, True, {"avx512_bf16"}), (False, False, set())],
)
def test_probe_uses_torchs_cpu_capability_query(
    monkeypatch: pytest.MonkeyPatch, fresh_probe, amx, avx512_bf16, expected
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert fresh_probe() == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", {"amx_bf16", "avx512_bf16"}), ("fpu sse avx2", set())],
)
def test_probe_falls_back_to_proc_cpuinfo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_probe, flags, expected
) -> None:
    """A torch without the capability query: the kernel's CPU flags decide."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    real = prec._cpuinfo_flags
    monkeypatch.setattr(prec, "_cpuinfo_flags", lambda: real(str(cpuinfo)))
    assert fresh_probe() == expected


def _first_and_final_loss(
    tiny_model_dir: Path, train: Path, out: Path, precision: str
) -> tuple[float, float]:
    ft = ModelFinetuner(
        FinetuningConfig(
            model_name=str(tiny_model_dir),
            output_dir=str(out),
            train_file=str(train),
            # Full fine-tuning: the random-weight tiny model learns the task in a few dozen steps
            # this way (a LoRA adapter on it needs hundreds); bf16 autocast runs every matmul in bf16.
            method="full",
            max_steps=30,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=1,
            precision=precision,
            progress_bar=False,
            resume="never",
            seed=0,
        )
    )
    ft.train()
    assert ft.precision == precision
    losses = [h["loss"] for h in ft.trainer.state.log_history if "loss" in h]
    ft.close()
    assert len(losses) == 30
    return losses[0], sum(losses[-5:]) / 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU training")
def test_bf16_on_cpu_converges_like_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same task, data and seed in fp32 and bf16 on CPU: the bf16 run learns it as well."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_task_records(16, seed=3)))
    first32, last32 = _first_and_final_loss(tiny_model_dir, train, tmp_path / "fp32", "fp32")
    first16, last16 = _first_and_final_loss(tiny_model_dir, train, tmp_path / "bf16", "bf16")
    assert first16 == pytest.approx(first32, rel=0.02)  # same model, same first batch
    assert last32 < 0.5 * first32 and last16 < 0.5 * first16  # both learned
    print(f"fp32 {first32:.3f} -> {last32:.3f}, bf16 {first16:.3f} -> {last16:.3f}")
    assert last16 == pytest.approx(last32, rel=0.15, abs=0.05)
