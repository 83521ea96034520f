"""transformers' Trainer, configured from a FinetuningConfig, with two small extensions.

``KubetuneTrainer`` adds to the stock Trainer:

* evaluation metrics beyond the loss: perplexity, and generation metrics (BLEU, ROUGE,
  exact match ...) computed inside ``evaluation_loop`` so that Trainer's logging, early
  stopping and best-checkpoint selection see them like ``eval_loss``;
* the EWC penalty (see ewc.py) in ``compute_loss`` when continual learning asks for it.

Training loop, optimizer, scheduler, mixed precision, DDP/DeepSpeed and checkpoint format
are the Trainer's own.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.distributed import cpu_backend_needed, deepspeed_config, dist_info
from kubetune_trainer.evaluation.metrics import perplexity
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.fast_paths import drop_padding_mask
from kubetune_trainer.methods import resolve_packing
from kubetune_trainer.tracking import run_name

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
# Non-scalar metrics are returned by ModelFinetuner.evaluate() but kept out of Trainer logs.
NON_SCALAR_METRICS = ("confusion_matrix",)


def checkpoints_dir(config: FinetuningConfig) -> Path:
    return Path(config.output_dir) / CHECKPOINTS_SUBDIR


def best_model_settings(config: FinetuningConfig) -> dict[str, Any]:
    """Periodic evaluation, and keeping the best checkpoint when evaluation and saving line up."""
    eval_strategy = config.resolved_eval_strategy
    save_strategy = "steps" if config.save_steps else "epoch"
    save_steps = config.save_steps
    if config.early_stopping is not None and eval_strategy == "steps" and save_steps is None:
        save_strategy, save_steps = "steps", config.eval_steps
    out: dict[str, Any] = {
        "eval_strategy": eval_strategy,
        "eval_steps": config.eval_steps,
        "save_strategy": save_strategy,
        "save_steps": save_steps if save_strategy == "steps" else None,
    }
    aligned = eval_strategy != "no" and eval_strategy == save_strategy
    if aligned and save_strategy == "steps" and save_steps % config.eval_steps:  # type: ignore[operator]
        aligned = False
    if config.early_stopping is not None and not aligned:
        raise ConfigError(
            "early_stopping keeps the best checkpoint, so checkpoints must be saved when evaluations happen: "
            f"eval_strategy={eval_strategy!r} eval_steps={config.eval_steps} but save_steps={config.save_steps}; "
            "make save_steps a multiple of eval_steps (or leave save_steps unset)"
        )
    if aligned:
        stop = config.early_stopping
        out |= {
            "load_best_model_at_end": True,
            "metric_for_best_model": stop.trainer_metric if stop else "eval_loss",
            "greater_is_better": stop.maximize if stop else False,
        }
    return out


def training_arguments(
    config: FinetuningConfig, precision: str, *, disable_tqdm: bool = False, **extra: Any
) -> TrainingArguments:
    """TrainingArguments for ``config`` (``precision`` already resolved: bf16 | fp16 | fp32)."""
    warmup: float = config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio
    kwargs: dict[str, Any] = {
        "output_dir": str(checkpoints_dir(config)),
        "num_train_epochs": config.num_train_epochs,
        "max_steps": config.max_steps or -1,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "per_device_eval_batch_size": config.per_device_eval_batch_size or config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "warmup_steps": warmup,  # transformers 5: a value < 1 is a ratio of the total steps
        "lr_scheduler_type": config.lr_scheduler_type,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "optim": config.optim,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "seed": config.seed,
        "data_seed": config.seed,
        "activation_checkpointing": config.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False}
        if config.gradient_checkpointing
        else None,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_total_limit": config.keep_last,
        "dataloader_num_workers": config.dataloader_num_workers,
        # transformers' tracker callbacks (rank 0 only); kubetune_trainer.tracking prepares their runs.
        "report_to": config.report_to or "none",
        "run_name": run_name(config),
        "disable_tqdm": disable_tqdm,
        # Our datasets yield exactly the model inputs; PEFT models hide `labels` from the
        # forward signature Trainer inspects, so name them explicitly.
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "include_num_input_tokens_seen": "non_padding",
        # Packed batches have no padding to save; padded ones waste least when lengths are alike.
        "train_sampling_strategy": "group_by_length"
        if config.group_by_length and not resolve_packing(config)
        else "random",
        "ddp_find_unused_parameters": False,
        **best_model_settings(config),
    }
    if cpu_backend_needed():
        kwargs["use_cpu"] = True
        if dist_info().distributed:
            kwargs["ddp_backend"] = "gloo"
    if config.deepspeed is not None:
        kwargs["deepspeed"] = deepspeed_config(config.deepspeed)
    kwargs.update(extra)
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:  # TrainingArguments' own cross-checks, e.g. an unknown optimizer name
        raise ConfigError(f"the training settings are inconsistent: {exc}") from None


class KubetuneTrainer(Trainer):
    """Trainer with generation metrics at evaluation, an optional EWC penalty, and right-padded
    batches run without their attention mask where that is the same computation (fast_paths)."""

    def __init__(
        self,
        *args: Any,
        eval_hook: Any = None,
        ewc: Any = None,
        drop_padding_mask: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # eval_hook(trainer, metric_key_prefix) -> dict of extra metrics (without prefix)
        self.eval_hook = eval_hook
        self.ewc = ewc
        self.drop_padding_mask = drop_padding_mask
        self.last_extra_metrics: dict[str, Any] = {}

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        assert output.metrics is not None
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(float(loss))
        self.last_extra_metrics = {}
        if self.eval_hook is not None:
            extra = self.eval_hook(self, metric_key_prefix)
            self.last_extra_metrics = dict(extra)
            for name, value in extra.items():
                if name not in NON_SCALAR_METRICS:
                    output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The Trainer has counted this batch's tokens from its mask already (non_padding).
        if self.drop_padding_mask:
            inputs = drop_padding_mask(inputs)
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.ewc is None or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        assert isinstance(loss, torch.Tensor)
        penalty = self.ewc.penalty(self.accelerator.unwrap_model(model))
        # Match the Trainer's accumulation scaling: when the loss is already normalised over the
        # whole accumulated batch, the per-micro-batch penalty must be divided by the steps too.
        scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        if scaled:
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


class LogMetricsCallback(TrainerCallback):
    """One log line per Trainer log event (``kubectl logs`` of a pod, where no progress bar is drawn)."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        parts = []
        for key, value in logs.items():
            if isinstance(value, float):
                parts.append(f"{key}={value:.4g}")
            elif isinstance(value, int | str):
                parts.append(f"{key}={value}")
        log.info("step %d/%d: %s", state.global_step, state.max_steps, " ".join(parts))


def safe_float(value: Any) -> Any:
    """NaN/inf become strings in JSON files (JSON has no NaN)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return value
