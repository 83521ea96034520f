"""Distributed training: generated DeepSpeed configs, and real 2-process runs under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.distributed import deep_merge, deepspeed_config, dist_info
from kubetune_trainer.settings import DeepSpeed as DeepSpeedSettings


def test_deepspeed_config_per_stage() -> None:
    z0 = deepspeed_config(DeepSpeedSettings(zero_stage=0))
    assert z0["zero_optimization"] == {"stage": 0}
    z2 = deepspeed_config(DeepSpeedSettings(zero_stage=2))
    assert z2["zero_optimization"]["stage"] == 2 and z2["zero_optimization"]["overlap_comm"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in z2["zero_optimization"]
    # Everything TrainingArguments knows is "auto", so the two cannot disagree.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert z2[key] == "auto"
    assert z2["bf16"]["enabled"] == "auto" and z2["fp16"]["enabled"] == "auto"
    assert "optimizer" not in z2  # Trainer's own AdamW
    z3 = deepspeed_config(DeepSpeedSettings(zero_stage=3))
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_offload_and_overrides() -> None:
    cfg = deepspeed_config(
        DeepSpeedSettings(
            zero_stage=3,
            offload="all",
            overrides={
                "zero_optimization": {"overlap_comm": False, "sub_group_size": 1000},
                "steps_per_print": 5,
            },
        )
    )
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["overlap_comm"] is False and zero["sub_group_size"] == 1000 and zero["stage"] == 3
    assert cfg["steps_per_print"] == 5
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == "auto"
    opt = deepspeed_config(DeepSpeedSettings(zero_stage=1, offload="optimizer"))["zero_optimization"]
    assert "offload_optimizer" in opt and "offload_param" not in opt


def test_deep_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    out = deep_merge(base, {"a": {"b": 9}, "d": [2], "e": 3})
    assert out == {"a": {"b": 9, "c": 2}, "d": [2], "e": 3}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_dist_info_from_torchrun_environment() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    info = dist_info(env)
    assert (info.rank, info.local_rank, info.world_size, info.node_rank, info.num_nodes) == (5, 1, 8, 1, 2)
    assert info.distributed and not info.is_global_rank0 and not info.is_local_rank0
    single = dist_info({})
    assert not single.distributed and single.is_global_rank0 and single.num_nodes == 1


def _torchrun(config: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    argv = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kubetune_trainer",
        "train",
        "--config",
        str(path),
    ]
    # Own process group: on a timeout the workers die with torchrun instead of lingering.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun timed out\n{stdout[-4000:]}\n{stderr[-8000:]}") from None
    res = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    assert res.returncode == 0, (
        f"torchrun exited {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"
    )
    return res


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.quickstart import write_task_data

    return write_task_data(tmp_path_factory.mktemp("dist-data"))


def _job(tiny_model_dir: Path, data: dict[str, Path], out: Path, **kw) -> dict:
    return {
        "model_name": str(tiny_model_dir),
        "output_dir": str(out),
        "train_file": str(data["train"]),
        "validation_file": str(data["validation"]),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.003,
        "save_steps": 2,
        "progress_bar": False,
        "resume": "never",
        **kw,
    }


def _assert_complete_adapter(out: Path, tiny_model_dir: Path) -> None:
    """Every LoRA tensor present with the shape PEFT expects, not empty, and the adapter loads."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(out / "adapter_model.safetensors")
    cfg = LoraConfig.from_pretrained(out)
    expected = get_peft_model_state_dict(
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    )
    assert set(saved) == set(expected)
    for key, tensor in saved.items():
        assert tensor.shape == expected[key].shape and tensor.numel() > 0, key
    # Trained: some lora_B (zero at init) moved.
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    ids = torch.tensor([[1, 40, 50, 60]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_lora_on_two_cpu_processes(
    stage: int, tiny_model_dir: Path, dist_data, tmp_path: Path
) -> None:
    out = tmp_path / f"out-z{stage}"
    _torchrun(_job(tiny_model_dir, dist_data, out, deepspeed={"zero_stage": stage}), tmp_path, f"z{stage}")
    _assert_complete_adapter(out, tiny_model_dir)
    shards = sorted(p.name for p in (out / "checkpoints" / "checkpoint-4" / "global_step4").iterdir())
    # Each rank saved its own optimizer shard: DeepSpeed really ran with 2 ranks.
    assert any("rank_1" in s or "rank1" in s for s in shards), shards
    if stage == 3:
        # Resume under ZeRO-3 from the sharded checkpoint of the first run.
        res = _torchrun(
            _job(
                tiny_model_dir,
                dist_data,
                out,
                deepspeed={"zero_stage": 3},
                max_steps=6,
                resume="auto",
                # Generation under ZeRO-3 needs every rank in each forward (synced_gpus).
                metrics=["perplexity", "exact_match"],
                eval_max_examples=4,
                eval_max_new_tokens=6,
            ),
            tmp_path,
            "z3b",
        )
        assert "resuming from local checkpoint" in res.stderr + res.stdout
        assert (out / "checkpoints" / "checkpoint-6").is_dir()
        metrics = json.loads((out / "metrics.json").read_text())["eval"]
        assert 0.0 <= metrics["eval_exact_match"] <= 1.0 and metrics["eval_perplexity"] > 1.0
        _assert_complete_adapter(out, tiny_model_dir)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_model_dir: Path, dist_data, tmp_path: Path) -> None:
    out = tmp_path / "out-ddp"
    res = _torchrun(_job(tiny_model_dir, dist_data, out), tmp_path, "ddp")
    _assert_complete_adapter(out, tiny_model_dir)
    assert "rank 1/2 joined the gloo process group" not in res.stderr  # non-zero ranks stay quiet
    assert (out / "metrics.json").is_file() and (out / "provenance.json").is_file()
