"""methods.py: PEFT configs per method, LoRA target detection, precision and hardware checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError, UnsupportedHardwareError
from kubetune_trainer.methods import (
    apply_method,
    build_peft_config,
    check_supported,
    detect_lora_targets,
    linear_module_names,
    model_load_kwargs,
    parameter_counts,
    resolve_packing,
    resolve_precision,
)
from kubetune_trainer.training import training_arguments


def _cfg(model: Path | str = "m", **kw) -> FinetuningConfig:
    return FinetuningConfig(model_name=str(model), train_file="t.jsonl", **kw)


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_detects_llama_attention_projections(llama) -> None:
    assert detect_lora_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "lm_head" not in linear_module_names(llama)


def test_detects_gpt2_conv1d_attention() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert detect_lora_targets(gpt2) == ["c_attn", "c_proj"]


def test_unknown_architecture_falls_back_to_its_linear_layers() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = torch.nn.Linear(4, 4)
            self.proj_out = torch.nn.Linear(4, 4)

    assert detect_lora_targets(Odd()) == ["mixer", "proj_out"]
    with pytest.raises(ConfigError, match=r"set lora.target_modules"):
        detect_lora_targets(torch.nn.Sequential(torch.nn.ReLU()))


def test_lora_config_from_settings(llama) -> None:
    cfg = _cfg(
        lora={"r": 4, "alpha": 8, "dropout": 0.1, "bias": "lora_only", "target_modules": ["q_proj", "v_proj"]}
    )
    pc = build_peft_config(cfg, llama)
    assert isinstance(pc, LoraConfig)
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, pc.bias) == (4, 8, 0.1, "lora_only")
    assert set(pc.target_modules) == {"q_proj", "v_proj"}
    assert (
        build_peft_config(_cfg(lora={"target_modules": "all-linear"}), llama).target_modules == "all-linear"
    )
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no Linear layer.*available: \["):
        build_peft_config(_cfg(lora={"target_modules": ["qkv"]}), llama)


def test_virtual_token_configs(llama, tiny_model_dir: Path) -> None:
    vt = {"num_virtual_tokens": 7, "encoder_hidden_size": 32, "prefix_projection": True}
    prefix = build_peft_config(_cfg(method="prefix", virtual_tokens=vt), llama)
    assert (
        isinstance(prefix, PrefixTuningConfig) and prefix.num_virtual_tokens == 7 and prefix.prefix_projection
    )
    prompt = build_peft_config(
        _cfg(tiny_model_dir, method="prompt", virtual_tokens={"prompt_init_text": "Translate colours"}), llama
    )
    assert isinstance(prompt, PromptTuningConfig) and prompt.prompt_tuning_init == PromptTuningInit.TEXT
    pt = build_peft_config(
        _cfg(method="ptuning", virtual_tokens={"encoder_reparameterization_type": "LSTM"}), llama
    )
    assert isinstance(pt, PromptEncoderConfig) and pt.encoder_hidden_size == 64
    assert build_peft_config(_cfg(method="full"), llama) is None


def test_apply_method_freezes_the_base_for_peft_and_not_for_full(tiny_model_dir: Path) -> None:
    lora = apply_method(_cfg(), AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    trainable, total = parameter_counts(lora)
    assert 0 < trainable < total / 10
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    full = apply_method(_cfg(method="full"), AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    trainable, total = parameter_counts(full)
    assert trainable == total


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_precision_and_hardware_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer import precision

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: frozenset())  # a CPU without bf16 units
    assert resolve_precision(_cfg()) == "fp32"  # test_precision.py: CPUs with AMX / AVX-512 BF16
    assert resolve_precision(_cfg(precision="bf16")) == "bf16"  # bf16 autocast works on CPU
    with pytest.raises(UnsupportedHardwareError, match=r"fp16.*needs a CUDA GPU"):
        resolve_precision(_cfg(precision="fp16"))
    with pytest.raises(UnsupportedHardwareError, match="'qlora' needs a CUDA GPU") as err:
        check_supported(_cfg(method="qlora"))
    assert err.value.exit_code == 4
    check_supported(_cfg(method="lora"))  # no error


def test_qlora_on_a_gpu_without_bitsandbytes_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from kubetune_trainer import ModelFinetuner

    real_find_spec = importlib.util.find_spec
    looked_up: list[str] = []

    def find_spec(name: str, *args, **kwargs):
        looked_up.append(name)
        return None if name.split(".")[0] == "bitsandbytes" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node ...
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)  # ... whose image lacks bitsandbytes
    cfg = _cfg(tmp_path / "no-such-model", method="qlora")
    with pytest.raises(UnsupportedHardwareError, match="'qlora' needs the bitsandbytes package") as err:
        check_supported(cfg)
    assert err.value.exit_code == 4
    assert "pip install bitsandbytes" in str(err.value) and "use method 'lora'" in str(err.value)
    assert "bitsandbytes" in looked_up
    # Through the API: load_model() fails the same way before touching the (missing) model directory.
    with pytest.raises(UnsupportedHardwareError, match="needs the bitsandbytes package"):
        ModelFinetuner(cfg).load_model()
    check_supported(_cfg(method="lora"))  # other methods do not need it


def test_packing_auto_packs_only_where_a_variable_length_kernel_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    from kubetune_trainer.packed_attention import PACKED_SDPA

    real_find_spec = importlib.util.find_spec
    flash_attn_installed = False

    def find_spec(name: str, *args, **kwargs):
        if name == "flash_attn":
            return real_find_spec("json") if flash_attn_installed else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # CPU: padded, length-grouped batches (the faster layout there, docs/benchmarks.md) ...
    assert _cfg().packing is None and resolve_packing(_cfg()) is False
    assert "attn_implementation" not in model_load_kwargs(_cfg(), "fp32")
    args = training_arguments(_cfg(output_dir=str(tmp_path)), "fp32")
    assert args.train_sampling_strategy == "group_by_length"
    # ... and what the user set wins, either way.
    assert resolve_packing(_cfg(packing=True)) is True
    assert model_load_kwargs(_cfg(packing=True), "fp32")["attn_implementation"] == PACKED_SDPA
    packed_args = training_arguments(_cfg(packing=True, output_dir=str(tmp_path)), "fp32")
    assert packed_args.train_sampling_strategy == "random"  # packed rows have no padding to group away
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_packing(_cfg()) is False  # a GPU without flash-attn: sdpa would attend the long row
    flash_attn_installed = True
    assert resolve_packing(_cfg()) is True
    assert model_load_kwargs(_cfg(), "bf16")["attn_implementation"] == "flash_attention_2"
    assert resolve_packing(_cfg(method="full")) is True
    assert resolve_packing(_cfg(packing=False)) is False
    assert resolve_packing(_cfg(method="prefix")) is False  # virtual tokens never pack
    assert resolve_packing(_cfg(precision="fp32")) is False  # flash-attn has no fp32 kernel
    assert resolve_packing(_cfg(attn_implementation="sdpa")) is False  # the user's kernel is not varlen
    assert resolve_packing(_cfg(attn_implementation="flash_attention_2")) is True


def test_model_load_kwargs() -> None:
    assert model_load_kwargs(_cfg(), "bf16")["dtype"] == torch.bfloat16
    # Full fine-tuning keeps fp32 master weights; mixed precision does the rest.
    assert model_load_kwargs(_cfg(method="full"), "bf16")["dtype"] == torch.float32
    assert model_load_kwargs(_cfg(model_revision="v1"), "fp32")["revision"] == "v1"
    assert "quantization_config" not in model_load_kwargs(_cfg(), "fp32")


def test_base_model_dtype_overrides_the_load_dtype() -> None:
    """A FineTuneJob's baseModel.dtype (FinetuningConfig.model_dtype) is the dtype the weights load in."""
    assert model_load_kwargs(_cfg(method="full", model_dtype="bfloat16"), "bf16")["dtype"] == torch.bfloat16
    assert model_load_kwargs(_cfg(model_dtype="float32"), "bf16")["dtype"] == torch.float32
    assert model_load_kwargs(_cfg(model_dtype="float16"), "fp32")["dtype"] == torch.float16
    with pytest.raises(ValueError, match="model_dtype"):
        _cfg(model_dtype="bf16")  # the API's spelling (torch names), not the precision's


def test_qlora_quantisation_config() -> None:
    kwargs = model_load_kwargs(_cfg(method="qlora", quantization={"double_quant": False}), "bf16")
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": 0}  # LOCAL_RANK unset: the first GPU
