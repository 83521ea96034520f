"""FineTuneJob manifest -> the trainer's FinetuningConfig (the ConfigMap's content).

Torch-free: imports only `kubetune_trainer.config` from the trainer. Used by the operator
(pods get the result as YAML) and by `kubetune run job.yaml --local`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubetune_trainer.config import AUGMENT_DEFAULT_FRACTION, EarlyStoppingSettings, FinetuningConfig

Body = dict[str, Any]

POD_OUTPUT_DIR = "/workspace/output"
PVC_MOUNT_ROOT = "/mnt/kubetune"
TRAINER_METRICS_PORT = 9400


def pvc_claims(spec: Body) -> list[str]:
    """PersistentVolumeClaims named by pvc:// URIs in the spec (the Job mounts each read-only)."""
    claims: list[str] = []
    for uri in _all_uris(spec):
        if uri.startswith("pvc://"):
            claim = uri[len("pvc://") :].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def _all_uris(spec: Body) -> list[str]:
    ds = spec.get("dataset") or {}
    base = spec.get("baseModel") or {}
    uris = [base.get("uri"), (base.get("initAdapter") or {}).get("uri")]
    for k in ("train", "validation", "test"):
        uris.append((ds.get(k) or {}).get("uri"))
    uris += [m.get("uri") for m in ds.get("mixture") or []]
    uris.append((ds.get("replay") or {}).get("uri"))
    aug = ds.get("augmentation") or {}
    uris.append((aug.get("synonyms") or {}).get("file"))
    uris.append((aug.get("paraphrase") or {}).get("model"))
    uris += [(aug.get("backTranslation") or {}).get(k) for k in ("model", "backModel")]
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


def to_config_dict(
    ftj: Body, *, in_pod: bool = True, base_dir: Path | None = None, init_adapter: str | None = None
) -> Body:
    """The FinetuningConfig fields for a FineTuneJob (spec as stored: camelCase, defaults applied).

    ``init_adapter``: the adapter URI a ``baseModel.initAdapter.fineTuneJobRef`` resolved to (the
    operator looks the job up); an ``initAdapter.uri`` is used as given.
    """
    spec = ftj.get("spec") or {}
    md = ftj.get("metadata") or {}

    def loc(uri: str | None) -> str | None:
        return resolve_uri(uri, in_pod=in_pod, base_dir=base_dir) if uri else None

    base = spec.get("baseModel") or {}
    ds = spec.get("dataset") or {}
    method = spec.get("method") or {}
    hp = spec.get("hyperparameters") or {}
    ev = spec.get("evaluation") or {}
    dist = spec.get("distributed") or {}
    ckpt = spec.get("checkpointing") or {}
    storage = spec.get("storage") or {}
    output = spec.get("output") or {}
    mtype = method.get("type", "lora")
    init = base.get("initAdapter") or {}
    if init_adapter is None and init.get("fineTuneJobRef") and not in_pod:
        raise ValueError(
            f"baseModel.initAdapter.fineTuneJobRef ({init['fineTuneJobRef'].get('name')}) names a FineTuneJob, "
            "which only the operator can look up; to run locally, set baseModel.initAdapter.uri to that job's "
            "status.output.adapterUri (or a local adapter directory) instead"
        )

    cfg: Body = {
        "model_name": loc(base.get("uri")),
        "model_revision": base.get("revision"),
        "trust_remote_code": bool(base.get("trustRemoteCode", False)),
        "init_adapter": loc(init_adapter or init.get("uri")),
        "method": mtype,
        "train_file": loc((ds.get("train") or {}).get("uri")),
        "data_format": (ds.get("train") or {}).get("format", "auto"),
        "validation_file": loc((ds.get("validation") or {}).get("uri")),
        "validation_split": ds.get("validationSplit"),
        "test_file": loc((ds.get("test") or {}).get("uri")),
        "max_seq_length": ds.get("maxSeqLength"),
        "packing": ds.get("packing"),
        "dedupe": ds.get("dedupe"),
        "mixture": [
            {"path": loc(m.get("uri")), "weight": m.get("weight", 1.0), "format": m.get("format", "auto")}
            for m in ds.get("mixture") or []
        ],
        "storage_uri": storage.get("uri"),
        "merge_adapter": bool(output.get("mergedModel", False)),
        "output_dir": POD_OUTPUT_DIR
        if in_pod
        else str((base_dir or Path.cwd()) / "output" / md.get("name", "job")),
    }
    replay = ds.get("replay") or {}
    if replay:
        cfg["replay_file"] = loc(replay.get("uri"))
        cfg["replay_fraction"] = replay.get("fraction")
        cfg["ewc_lambda"] = replay.get("ewcLambda")

    aug = ds.get("augmentation") or {}
    if aug:
        cfg["augmentation"] = _augmentation(aug, loc)

    lora = method.get("lora") or method.get("qlora") or {}
    if lora:
        cfg["lora"] = {
            "r": lora.get("r"),
            "alpha": lora.get("alpha"),
            "dropout": lora.get("dropout"),
            "target_modules": lora.get("targetModules"),
            "bias": lora.get("bias"),
        }
    q = method.get("qlora") or {}
    if q:
        cfg["quantization"] = {
            "bits": q.get("bits"),
            "quant_type": q.get("quantType"),
            "double_quant": q.get("doubleQuant"),
        }
    vt = method.get(mtype) if mtype in ("prefix", "prompt", "ptuning") else None
    if vt:
        cfg["virtual_tokens"] = {
            "num_virtual_tokens": vt.get("numVirtualTokens"),
            "prompt_init_text": vt.get("promptInitText"),
            "encoder_hidden_size": vt.get("encoderHiddenSize"),
            "encoder_reparameterization_type": vt.get("encoderReparameterizationType"),
            "prefix_projection": vt.get("prefixProjection"),
        }

    cfg.update(
        num_train_epochs=hp.get("epochs"),
        max_steps=hp.get("maxSteps"),
        learning_rate=hp.get("learningRate"),
        per_device_train_batch_size=hp.get("batchSizePerDevice"),
        gradient_accumulation_steps=hp.get("gradientAccumulationSteps"),
        warmup_ratio=hp.get("warmupRatio"),
        warmup_steps=hp.get("warmupSteps"),
        lr_scheduler_type=hp.get("scheduler"),
        weight_decay=hp.get("weightDecay"),
        max_grad_norm=hp.get("maxGradNorm"),
        precision=hp.get("precision"),
        seed=hp.get("seed"),
        gradient_checkpointing=hp.get("gradientCheckpointing"),
    )

    if ev:
        cfg["metrics"] = ev.get("metrics")
        cfg["eval_steps"] = ev.get("everySteps")
        cfg["semantic_model"] = ev.get("semanticModel")
        if ev.get("strategy"):
            cfg["eval_strategy"] = ev["strategy"]
        es = ev.get("earlyStopping")
        if es is not None:
            # Present means on, even as `{}` in a manifest the API server has not defaulted
            # (`kubetune run --local`); the trainer's defaults are the CRD's.
            cfg["early_stopping"] = EarlyStoppingSettings().model_dump() | {
                k: es[k] for k in ("metric", "patience", "threshold") if es.get(k) is not None
            }

    if dist.get("strategy", "deepspeed") == "deepspeed":
        dsp = dist.get("deepspeed") or {}
        # An absent block means the documented default (ZeRO-2, no offload), not DDP.
        cfg["deepspeed"] = {
            "zero_stage": dsp.get("zeroStage", 2),
            "offload": dsp.get("offload", "none"),
            "overrides": dsp.get("config") or dsp.get("overrides") or {},
        }

    cfg.update(save_steps=ckpt.get("everySteps"), keep_last=ckpt.get("keepLast"), resume=ckpt.get("resume"))
    tracking = spec.get("tracking") or {}
    if tracking.get("reportTo"):
        cfg["report_to"] = list(tracking["reportTo"])
    mlflow = tracking.get("mlflow") or {}
    if mlflow:
        # Where, not who: the credentials reach the pods as env vars from their Secret (builders.py).
        cfg["mlflow"] = {"tracking_uri": mlflow.get("trackingUri"), "experiment": mlflow.get("experiment")}
    if md.get("name") and md.get("namespace"):
        cfg["job"] = {"namespace": md["namespace"], "name": md["name"], "uid": md.get("uid")}
    if in_pod:
        cfg.update(metrics_port=TRAINER_METRICS_PORT, progress_bar=False)
    return _drop_none(cfg)


def _augmentation(aug: Body, loc: Any) -> Body:
    """spec.dataset.augmentation -> FinetuningConfig.augmentation (URIs resolved like the base model's)."""
    common = ("variants", "maxVariants", "batchSize", "maxNewTokens", "includeResponse", "prompt")

    def model_block(block: Body, *uris: str) -> Body:
        out = {_snake(k): block.get(k) for k in common}
        out |= {_snake(k): loc(block.get(k)) for k in uris}
        if "backPrompt" in block:
            out["back_prompt"] = block["backPrompt"]
        return out

    out: Body = {}
    if aug.get("synonyms") is not None:
        syn = aug["synonyms"]
        out["synonyms"] = {
            # Present means on, even as `synonyms: {}` in a manifest the API server has not defaulted.
            "fraction": syn.get("fraction", AUGMENT_DEFAULT_FRACTION),
            "variants": syn.get("variants"),
            "synonyms_file": loc(syn.get("file")),
            "include_response": syn.get("includeResponse"),
        }
    if aug.get("paraphrase") is not None:
        out["paraphrase"] = model_block(aug["paraphrase"], "model")
    if aug.get("backTranslation") is not None:
        out["back_translation"] = model_block(aug["backTranslation"], "model", "backModel")
    return out


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _drop_none(value: Any) -> Any:
    """Unset fields take the trainer's defaults (the CRD's defaults are the same numbers)."""
    if isinstance(value, dict):
        return {
            k: _drop_none(v)
            for k, v in value.items()
            if v is not None and not (isinstance(v, dict) and not _drop_none(v))
        }
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def finetunejob_to_config(
    ftj: Body, *, base_dir: Path | None = None, in_pod: bool = False
) -> FinetuningConfig:
    """`kubetune run job.yaml --local`: validate and convert a FineTuneJob manifest."""
    return FinetuningConfig.from_dict(
        to_config_dict(ftj, in_pod=in_pod, base_dir=base_dir), source="FineTuneJob"
    )
