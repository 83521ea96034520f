"""Experiment tracking: transformers' reporting integrations (``report_to``) around a run.

transformers' own callbacks (``TensorBoardCallback``, ``MLflowCallback`` ...) log the
hyperparameters and every Trainer log (loss, learning rate, evaluations) on global rank 0. This
module adds what a kubetune run needs around them:

* a check before any work that every configured tracker's package is installed (exit 2 with the
  package to install, instead of a traceback from inside Trainer);
* TensorBoard event files under ``<output_dir>/tensorboard/``, so they are uploaded to S3 with
  the adapter;
* one MLflow run per ``train()``, started here rather than by the callback, so that the
  evaluations after training (``evaluate()``, ``test()``) and ``training_curves.png`` land in the
  same run, tagged with the FineTuneJob and attempt.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_SUBDIR = "tensorboard"

# report_to name -> (transformers' availability check, the package that provides it)
_INTEGRATIONS: dict[str, tuple[str, str]] = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "mlflow": ("is_mlflow_available", "mlflow-skinny"),
    "wandb": ("is_wandb_available", "wandb"),
    "comet_ml": ("is_comet_available", "comet-ml"),
    "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "neptune": ("is_neptune_available", "neptune"),
    "trackio": ("is_trackio_available", "trackio"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "azure_ml": ("is_azureml_available", "azureml-core"),
    "dagshub": ("is_dagshub_available", "dagshub"),
    "flyte": ("is_flytekit_available", "flytekit"),
}


# MLflow's error codes for a request the server will not accept with these credentials.
_REFUSED = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def check_report_to(config: FinetuningConfig) -> None:
    """Fail before any work when a tracker in ``report_to`` cannot run here."""
    if not config.report_to:
        return
    utils = importlib.import_module("transformers.integrations.integration_utils")
    missing = []
    for name in config.report_to:
        check, package = _INTEGRATIONS[name]
        available = getattr(utils, check, None)
        if available is None or not available():
            missing.append((name, package))
    if missing:
        names = ", ".join(name for name, _ in missing)
        packages = " ".join(package for _, package in missing)
        raise ConfigError(
            f"report_to names {names}, but this installation lacks its package: `pip install {packages}`, "
            f"or remove {names} from report_to (the kubetune trainer image has tensorboard and mlflow)"
        )


def run_name(config: FinetuningConfig) -> str:
    """The name trackers show for a run: the FineTuneJob's namespace/name, else the output folder's."""
    if config.job is not None:
        return f"{config.job.namespace}/{config.job.name}"
    return Path(config.output_dir).resolve().name


class TrackingRun:
    """The trackers' side of one ``train()``: set up before the Trainer exists, ended by :meth:`end`."""

    def __init__(self, config: FinetuningConfig, is_global_rank0: bool):
        self.config = config
        self.is_global_rank0 = is_global_rank0
        self.mlflow_run_id: str | None = None
        self._mlflow: Any = None

    def start(self) -> TrackingRun:
        cfg = self.config
        if "tensorboard" in cfg.report_to:
            # TensorBoardCallback reads its directory from here when the Trainer creates it.
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir).resolve() / TENSORBOARD_SUBDIR)
        if "mlflow" in cfg.report_to and self.is_global_rank0:
            self._start_mlflow()
        return self

    def _start_mlflow(self) -> None:
        import mlflow

        cfg = self.config
        active = mlflow.active_run()
        if active is not None:
            # The caller's own run (a notebook's `with mlflow.start_run():`): MLflowCallback logs into it.
            log.info("logging to the active MLflow run %s", active.info.run_id)
            return
        if cfg.mlflow.tracking_uri:
            mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        tags = {"kubetune.method": cfg.method, "kubetune.model": cfg.model_name}
        if cfg.job is not None:
            tags |= {
                "kubetune.job": f"{cfg.job.namespace}/{cfg.job.name}",
                "kubetune.job_uid": cfg.job.uid or "",
            }
        if os.environ.get("KUBETUNE_ATTEMPT"):
            tags["kubetune.attempt"] = os.environ["KUBETUNE_ATTEMPT"]
        root = cfg.storage_root()
        if root:
            tags["kubetune.output"] = root
        try:
            if cfg.mlflow.experiment:
                mlflow.set_experiment(cfg.mlflow.experiment)
            run = mlflow.start_run(run_name=run_name(cfg), tags=tags)
        except mlflow.exceptions.MlflowException as exc:
            if getattr(exc, "error_code", None) not in _REFUSED:
                raise  # the server is down or failing: an error worth retrying
            # Wrong or missing credentials: another attempt would be refused just the same.
            raise ConfigError(
                f"the MLflow server {mlflow.get_tracking_uri()} refused the request ({exc.error_code}): give "
                "credentials it accepts in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                "MLFLOW_TRACKING_TOKEN (in a FineTuneJob: the Secret named in "
                "spec.tracking.mlflow.credentialsSecretRef)"
            ) from None
        self._mlflow = mlflow
        self.mlflow_run_id = run.info.run_id
        log.info("MLflow run %s at %s", run.info.run_id, mlflow.get_tracking_uri())

    def log_artifact(self, path: Path) -> None:
        """Attach a file (the training curves) to the MLflow run; a failure only warns."""
        if self._mlflow is None or not path.is_file():
            return
        try:
            self._mlflow.log_artifact(str(path), run_id=self.mlflow_run_id)
        except Exception as exc:  # the tracker's artifact store is optional to the run
            log.warning("could not attach %s to MLflow run %s: %s", path.name, self.mlflow_run_id, exc)

    def end(self, status: str = "FINISHED") -> None:
        """End the MLflow run this object started (FINISHED, FAILED or KILLED); flushes pending logs."""
        if self._mlflow is None:
            return
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.mlflow_run_id:
            self._mlflow.end_run(status=status)
        self._mlflow = None
