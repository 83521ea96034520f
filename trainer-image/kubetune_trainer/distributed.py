"""Distributed training: DeepSpeed ZeRO configs generated from the spec, and DDP.

Processes are started by torchrun (``torchrun ... -m kubetune_trainer train --config FILE``),
which sets RANK / LOCAL_RANK / WORLD_SIZE / GROUP_RANK. transformers' Trainer (through
accelerate) then wraps the model in DDP, or hands it to DeepSpeed when
``TrainingArguments.deepspeed`` holds a config.

The generated DeepSpeed config uses ``"auto"`` for every value that TrainingArguments
already knows (batch sizes, accumulation, clipping, precision, optimizer hyperparameters),
so the two can never disagree; the user's ``overrides`` are deep-merged last.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.settings import DeepSpeed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits (from torchrun's environment; single process when absent)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def is_global_rank0(self) -> bool:
        return self.rank == 0

    @property
    def is_local_rank0(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(env: dict[str, str] | None = None) -> DistInfo:
    e = os.environ if env is None else env
    world = int(e.get("WORLD_SIZE", "1"))
    local_world = int(e.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(
        rank=int(e.get("RANK", "0")),
        local_rank=int(e.get("LOCAL_RANK", "0")),
        world_size=world,
        # torchrun calls the node index GROUP_RANK; the operator also sets NODE_RANK.
        node_rank=int(e.get("GROUP_RANK", e.get("NODE_RANK", "0"))),
        num_nodes=max(1, world // max(1, local_world)),
    )


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins; nested dicts merge key by key; returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(settings: DeepSpeed) -> dict[str, Any]:
    """A DeepSpeed JSON config for Trainer's integration (``TrainingArguments(deepspeed=...)``)."""
    stage = settings.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero |= {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Without this, save_model under ZeRO-3 writes an adapter file with empty tensors:
            # the parameters are sharded and only a gather on save produces the real weights.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if settings.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # progress is reported by kubetune, not DeepSpeed
        "wall_clock_breakdown": False,
    }
    if settings.offload != "none":
        # Offloaded optimizer states need DeepSpeed's CPU Adam; hyperparameters still come from
        # TrainingArguments through "auto".
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return deep_merge(config, settings.overrides or {})


def cpu_backend_needed() -> bool:
    import torch

    return not torch.cuda.is_available()


def init_distributed(use_deepspeed: bool) -> DistInfo:
    """Join the process group started by torchrun (no-op for a single process).

    On machines without CUDA the backend is gloo (tests and CPU clusters); with GPUs, NCCL.
    DeepSpeed needs its own ``init_distributed`` so its communication layer is set up too.
    """
    info = dist_info()
    if not info.distributed:
        return info
    import torch
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return info
    backend = "gloo" if cpu_backend_needed() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        tdist.init_process_group(backend=backend)
    log.info("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return info


@contextlib.contextmanager
def local_main_first(dist: DistInfo) -> Iterator[None]:
    """Local rank 0 runs the body first; the other ranks of the node wait, then run it."""
    import torch.distributed as tdist

    active = dist.distributed and tdist.is_available() and tdist.is_initialized()
    if active and not dist.is_local_rank0:
        tdist.barrier()
    yield
    if active and dist.is_local_rank0:
        tdist.barrier()
