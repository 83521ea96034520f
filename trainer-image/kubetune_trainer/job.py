"""What a training pod does (``kubetune train --config``): ``run_training(config)``.

Load, train (resuming from the newest complete checkpoint), evaluate, test, save, upload, all
through the guide's ``ModelFinetuner``. It returns a ``TrainingResult``, from which
``kubetune_trainer.pod`` writes the operator's report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kubetune_trainer.artifacts import MERGED_SUBDIR, saved_output
from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.finetuner import ModelFinetuner
from kubetune_trainer.methods import parameter_counts


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """What a finished run produced (global rank 0 has the URIs; other ranks get None there)."""

    output_dir: Path
    adapter_uri: str | None  # <storage root>/final/ when uploaded
    merged_uri: str | None  # <storage root>/final/merged/ when a merged model was uploaded
    trainable_parameters: int
    total_parameters: int
    train_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]
    test_metrics: dict[str, Any]
    # Data augmentation counts, {method: {generated, kept, dropped}} (data/augment.py); empty when off.
    augmentation: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # What was saved, read back from the output (artifacts.saved_output): method, LoRA rank as trained.
    saved: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_training(config: FinetuningConfig) -> TrainingResult:
    """What a training pod does: train, evaluate, test, save, upload."""
    if "replay_fraction" in config.model_fields_set and config.replay_fraction > 0 and not config.replay_file:
        raise ConfigError("replay_fraction > 0 needs replay_file (data from the earlier tasks)")
    ft = ModelFinetuner(config)
    try:
        ft.load_model()
        ft.train()
        if ft.trainer is not None and ft.trainer.eval_dataset is not None:
            ft.evaluate()
        if config.test_file:
            ft.test()
        out = ft.save_model()
        ft.write_metrics()
        uri = ft.upload_final()
        if ft.dist.is_global_rank0:
            where = uri or str(Path(config.output_dir).resolve())
            print(f"done: output in {where}", flush=True)
        trainable, total = parameter_counts(ft.model)
        return TrainingResult(
            output_dir=Path(config.output_dir),
            adapter_uri=uri,
            merged_uri=f"{uri}{MERGED_SUBDIR}/" if uri and ft.merged_dir is not None else None,
            trainable_parameters=trainable,
            total_parameters=total,
            train_metrics=ft.train_metrics,
            eval_metrics=ft.eval_metrics,
            test_metrics=ft.test_metrics,
            augmentation=dict(ft.data.stats.augmentation) if ft.data is not None else {},
            saved=saved_output(out, config.method) if ft.dist.is_global_rank0 else {},
        )
    except BaseException:
        ft.close("FAILED")
        raise
    finally:
        ft.close()
