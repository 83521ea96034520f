"""FineTuneJob -> the trainer's FinetuningConfig (the ConfigMap's content).

Works on the typed model: the manifest is validated (the API's defaults and rules) and its
blocks are handed over as they are, since both sides declare them once in
kubetune_trainer.settings. The flat fields of FinetuningConfig say which block field they are
(`settings.sources`), so the mapping below is only what is not a setting: URIs, identity, paths.

Torch-free. Used by the operator (pods get the result as YAML) and by `kubetune run job.yaml --local`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.settings import (
    Checkpointing,
    DatasetOptions,
    DeepSpeed,
    Evaluation,
    Hyperparameters,
    LoraParams,
    QuantizationParams,
    VirtualTokenParams,
    sources,
)

from .api import FineTuneJob, FineTuneJobSpec, InvalidManifestError, load_finetunejob
from .api.finetunejob import Augmentation, Storage
from .api.manifest import load_model

Body = dict[str, Any]

POD_OUTPUT_DIR = "/workspace/output"
PVC_MOUNT_ROOT = "/mnt/kubetune"
TRAINER_METRICS_PORT = 9400

# Where each block of FinetuningConfig's flat fields sits in the spec.
_SPEC_BLOCK = {
    Hyperparameters: "hyperparameters",
    Evaluation: "evaluation",
    Checkpointing: "checkpointing",
    DatasetOptions: "dataset",
}


class LocalFineTuneJobSpec(FineTuneJobSpec):
    """What `kubetune run job.yaml --local` accepts: the same spec, storage optional (a local run
    keeps its files under output/ when the manifest names no bucket)."""

    storage: Storage | None = Field(None, description="S3-compatible storage (optional locally).")  # type: ignore[assignment]


class LocalFineTuneJob(FineTuneJob):
    spec: LocalFineTuneJobSpec = Field(description="The FineTuneJob spec.")


def pvc_claims(spec: FineTuneJobSpec | Body) -> list[str]:
    """PersistentVolumeClaims named by pvc:// URIs in the spec (the Job mounts each read-only)."""
    typed_spec = (
        spec
        if isinstance(spec, FineTuneJobSpec)
        else FineTuneJobSpec.model_validate(spec, by_alias=True, by_name=False)
    )
    claims: list[str] = []
    for uri in _all_uris(typed_spec):
        if uri.startswith("pvc://"):
            claim = uri[len("pvc://") :].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def _all_uris(spec: FineTuneJobSpec) -> list[str]:
    ds, base, aug = spec.dataset, spec.base_model, spec.dataset.augmentation
    sources_ = [ds.train, ds.validation, ds.test, ds.replay, *(ds.mixture or [])]
    uris = [base.uri, base.init_adapter and base.init_adapter.uri, *(s.uri for s in sources_ if s)]
    if aug is not None:
        uris += [aug.synonyms and aug.synonyms.file, aug.paraphrase and aug.paraphrase.model]
        if aug.back_translation is not None:
            uris += [aug.back_translation.model, aug.back_translation.back_model]
    return [u for u in uris if u]


def resolve_uri(uri: str, *, in_pod: bool, base_dir: Path | None = None) -> str:
    """Where the trainer finds a model or data URI.

    hf://org/name -> the hub id; file:///p -> /p; pvc://claim/p -> the claim's mount in the pod;
    s3://... stays (the trainer downloads it); a plain relative path is relative to base_dir.
    """
    if uri.startswith("hf://"):
        return uri[len("hf://") :]
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://") :].partition("/")
        if not in_pod:
            raise ValueError(
                f"{uri}: pvc:// sources only exist inside the cluster; use a local path to run locally"
            )
        return f"{PVC_MOUNT_ROOT}/{claim}/{path}".rstrip("/")
    if "://" in uri or base_dir is None or os.path.isabs(uri):
        return uri
    return str(base_dir / uri)


def typed(ftj: FineTuneJob | Body, *, in_pod: bool = True) -> FineTuneJob:
    """The typed FineTuneJob.

    For the cluster, validated as the API server does. For `kubetune run --local`, the bounds and
    enums only: the cluster's rules (URI schemes, GPUs, storage) do not apply to a laptop, where a
    base model may be a local directory, and the rules on training settings are FinetuningConfig's
    own (the same rules, with the same messages). Locally, numbers are read as FinetuningConfig
    reads them (PyYAML reads `1e-06` as a string, where the API server's YAML reads a number).
    """
    if isinstance(ftj, FineTuneJob):
        return ftj
    if in_pod:
        return load_finetunejob(ftj)
    return load_model(LocalFineTuneJob, ftj, check_rules=False, strict=False)


def to_config(
    ftj: FineTuneJob | Body,
    *,
    in_pod: bool = True,
    base_dir: Path | None = None,
    init_adapter: str | None = None,
) -> FinetuningConfig:
    """The FinetuningConfig of a FineTuneJob.

    ``init_adapter``: the adapter URI a ``baseModel.initAdapter.fineTuneJobRef`` resolved to (the
    operator looks the job up); an ``initAdapter.uri`` is used as given.
    """
    job = typed(ftj, in_pod=in_pod)
    spec, md = job.spec, job.metadata
    base, ds, method = spec.base_model, spec.dataset, spec.method

    def loc(uri: str | None) -> str | None:
        return resolve_uri(uri, in_pod=in_pod, base_dir=base_dir) if uri else None

    init = base.init_adapter
    if init_adapter is None and init is not None and init.fine_tune_job_ref is not None and not in_pod:
        raise ValueError(
            f"baseModel.initAdapter.fineTuneJobRef ({init.fine_tune_job_ref.name}) names a FineTuneJob, "
            "which only the operator can look up; to run locally, set baseModel.initAdapter.uri to that job's "
            "status.output.adapterUri (or a local adapter directory) instead"
        )
    # The flat settings: FinetuningConfig field <- the spec block field it is declared as.
    cfg: Body = {
        field: getattr(getattr(spec, _SPEC_BLOCK[src.block]), src.name)
        for field, src in sources(FinetuningConfig).items()
    }
    lora = method.lora or method.qlora
    virtual_tokens = (
        getattr(method, method.type, None) if method.type in ("prefix", "prompt", "ptuning") else None
    )
    cfg |= {
        "model_name": loc(base.uri),
        "model_revision": base.revision,
        "model_dtype": base.dtype,
        "trust_remote_code": base.trust_remote_code,
        "init_adapter": loc(init_adapter or (init.uri if init else None)),
        "method": method.type,
        "lora": _fields(lora, LoraParams),
        "quantization": _fields(method.qlora, QuantizationParams),
        "virtual_tokens": _fields(virtual_tokens, VirtualTokenParams),
        "train_file": loc(ds.train.uri) if ds.train else None,
        "data_format": ds.train.format if ds.train else "auto",
        "validation_file": loc(ds.validation.uri) if ds.validation else None,
        "test_file": loc(ds.test.uri) if ds.test else None,
        # Each file has its own format in the API ("auto": detected from that file's records).
        "validation_format": ds.validation.format if ds.validation else None,
        "test_format": ds.test.format if ds.test else None,
        "mixture": [{"path": loc(m.uri), "weight": m.weight, "format": m.format} for m in ds.mixture or []],
        "augmentation": _augmentation(ds.augmentation, loc),
        "early_stopping": _fields(spec.evaluation.early_stopping),
        # An absent deepspeed block means the documented default (ZeRO-2, no offload), not DDP.
        "deepspeed": _fields(spec.distributed.deepspeed or DeepSpeed())
        if spec.distributed.strategy == "deepspeed"
        else None,
        "storage_uri": spec.storage.uri if spec.storage else None,
        "merge_adapter": spec.output.merged_model,
        "output_dir": POD_OUTPUT_DIR
        if in_pod
        else str((base_dir or Path.cwd()) / "output" / md.get("name", "job")),
    }
    if ds.replay is not None:
        cfg |= {
            "replay_file": loc(ds.replay.uri),
            "replay_fraction": ds.replay.fraction,
            "ewc_lambda": ds.replay.ewc_lambda,
        }
    if spec.tracking is not None:
        cfg["report_to"] = list(spec.tracking.report_to or [])
        if spec.tracking.mlflow is not None:
            # Where, not who: the credentials reach the pods as env vars from their Secret (builders.py).
            cfg["mlflow"] = {
                "tracking_uri": spec.tracking.mlflow.tracking_uri,
                "experiment": spec.tracking.mlflow.experiment,
            }
    if md.get("name") and md.get("namespace"):
        cfg["job"] = {"namespace": md["namespace"], "name": md["name"], "uid": md.get("uid")}
    if in_pod:
        cfg |= {"metrics_port": TRAINER_METRICS_PORT, "progress_bar": False}
    return FinetuningConfig.from_dict({k: v for k, v in cfg.items() if v is not None}, source="FineTuneJob")


def to_config_dict(
    ftj: FineTuneJob | Body,
    *,
    in_pod: bool = True,
    base_dir: Path | None = None,
    init_adapter: str | None = None,
) -> Body:
    """The ConfigMap's content: the FinetuningConfig fields that differ from the defaults."""
    return to_config(ftj, in_pod=in_pod, base_dir=base_dir, init_adapter=init_adapter).to_dict()


def finetunejob_to_config(
    ftj: Body, *, base_dir: Path | None = None, in_pod: bool = False
) -> FinetuningConfig:
    """`kubetune run job.yaml --local`: validate and convert a FineTuneJob manifest.

    An invalid manifest is a configuration error (exit code 2), as an invalid FinetuningConfig is.
    """
    try:
        return to_config(ftj, in_pod=in_pod, base_dir=base_dir)
    except InvalidManifestError as exc:
        raise ConfigError(str(exc)) from None


def _fields(block: BaseModel | None, like: type[BaseModel] | None = None) -> Body | None:
    """A block's settings by their Python names (only those of ``like``: qlora holds LoRA's and quantization's)."""
    if block is None:
        return None
    names = (like or type(block)).model_fields
    return {name: getattr(block, name) for name in names if hasattr(block, name)}


def _augmentation(aug: Augmentation | None, loc: Any) -> Body | None:
    """spec.dataset.augmentation -> FinetuningConfig.augmentation (URIs resolved like the base model's)."""
    if aug is None:
        return None
    out: Body = {}
    if aug.synonyms is not None:  # the trainer's name for the file: synonyms_file
        fields = aug.synonyms.model_dump(by_alias=False, exclude={"file"})
        out["synonyms"] = fields | {"synonyms_file": loc(aug.synonyms.file)}
    for name, block in (("paraphrase", aug.paraphrase), ("back_translation", aug.back_translation)):
        if block is not None:
            fields = block.model_dump(by_alias=False, exclude_none=True)
            out[name] = fields | {k: loc(fields[k]) for k in ("model", "back_model") if k in fields}
    return out
