"""Every field the API accepts does something: a spec field that nothing reads fails here.

The test walks the generated CRD schemas (crds/*.yaml) down to their leaves. For each leaf it takes
a full manifest that sets it (the FIXTURES below), changes the value to another valid one (derived
from the schema: another enum value, the other boolean, a number within its bounds, a string the
API's own rules accept, or the field left out), and renders what the operator makes of the object:
the trainer config and the Job, ServiceAccount, Role and Service of a FineTuneJob; the Deployment,
Service, ConfigMap, HPA and NetworkPolicy of an AdapterDeployment. A leaf is read when some valid
change of it changes that output.

How it fails, on purpose:
- a field added to the API and set in no fixture: "no fixture sets it" (set it in a fixture);
- a field that no valid change makes a difference for: "nothing reads it" (wire it, or remove it);
- an allow-list entry for a field that does change the output, or that the API no longer has.

Fields whose effect is not in the rendered objects are allow-listed in READ_BY_RECONCILE, each
with the code that reads it and the test that proves it. TO_WIRE lists fields another branch wires
(the lead empties it at merge); nothing else belongs there.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.adapterdeployment import builders as ab
from kubetune_operator.adapterdeployment import reconcile as ar
from kubetune_operator.api import (
    InvalidManifestError,
    load_adapterdeployment,
    load_finetunejob,
    load_finetunesweep,
)
from kubetune_operator.convert import to_config_dict
from kubetune_operator.finetunejob import builders as fb
from kubetune_operator.finetunesweep import builders as sb
from kubetune_operator.finetunesweep import study
from kubetune_operator.settings import Settings

CRDS = Path(__file__).resolve().parents[2] / "crds"
SETTINGS = Settings(
    trainer_image="kubetune/trainer:test",
    vllm_image="vllm/vllm-openai:test",
    image_pull_policy="IfNotPresent",
    default_s3_endpoint="",
    default_s3_region="us-east-1",
    default_s3_secret="",
    termination_grace_seconds=300,
)
META = {"name": "fields", "namespace": "team-a", "uid": "u-1", "generation": 1}

# Read by the reconcile loop, not by the builders: each names where, and the test that shows it.
READ_BY_RECONCILE: dict[str, dict[str, str]] = {
    "FineTuneJob": {
        # finetunejob/reconcile.py: retries a failed attempt while attempt <= maxRestarts
        # (tests/integration/test_operator_finetunejob.py::test_failed_attempt_restarts_then_fails_...).
        "spec.runPolicy.maxRestarts": "reconcile: restarts",
        # finetunejob/reconcile.py: the deadline left over all attempts, passed to builders.job
        # (test_operator_finetunejob.py::test_active_deadline_fails_the_job).
        "spec.runPolicy.activeDeadlineSeconds": "reconcile: remaining deadline",
        # finetunejob/reconcile.py::_expire deletes the finished FineTuneJob
        # (test_operator_finetunejob.py::test_ttl_after_finished_deletes_the_job).
        "spec.runPolicy.ttlSecondsAfterFinished": "reconcile: _expire",
        # finetunejob/reconcile.py patches the live Job's suspend
        # (test_operator_finetunejob.py::test_suspend_and_resume).
        "spec.runPolicy.suspend": "reconcile: suspension",
        # finetunejob/init_adapter.py resolves the job to its status.output.adapterUri
        # (tests/integration/test_operator_init_adapter.py).
        "spec.baseModel.initAdapter.fineTuneJobRef.name": "init_adapter: resolution",
    },
    "AdapterDeployment": {
        # adapterdeployment/reconcile.py::resolve reads the referenced job / sweep
        # (tests/integration/test_operator_adapterdeployment.py::test_finetunejob_ref_waits_then_resolves_...,
        # ::test_vllm_sizes_lora_slots_from_the_rank_the_trainer_reports; test_operator_finetunesweep.py).
        "spec.adapters[].fineTuneJobRef.name": "reconcile: resolve",
        "spec.adapters[].fineTuneSweepRef.name": "reconcile: resolve",
    },
    "FineTuneSweep": {
        # finetunesweep/reconcile.py starts trials while fewer than parallelism run
        # (tests/integration/test_operator_finetunesweep.py::test_grid_sweep_runs_every_point_once_within_...).
        "spec.parallelism": "reconcile: trials at once",
        # finetunesweep/reconcile.py::_observe reads the metric from each finished trial's status
        # (test_operator_finetunesweep.py::test_grid_sweep_runs_every_point_once_..._reports_the_best).
        "spec.objective.metric": "reconcile: objective",
    },
}

# TO WIRE: accepted but not yet read; another branch (onedef) wires these. The lead empties this
# list at merge; the test fails once a listed field is read, so a stale entry cannot stay.
TO_WIRE: dict[str, set[str]] = {
    "FineTuneJob": set(),
    "AdapterDeployment": set(),
    "FineTuneSweep": set(),
}

# A sweep's template is a FineTuneJob spec, copied into every trial with the trial's parameters
# set (test_a_sweep_template_reaches_every_trial): its fields are walked as FineTuneJob fields.
SWEEP_TEMPLATE = "spec.template."


# ---------------------------------------------------------------------------------- fixtures

_STORAGE = {
    "uri": "s3://ckpt/runs",
    "endpoint": "http://minio.minio.svc:9000",
    "region": "eu-west-1",
    "secretRef": {"name": "s3-creds", "accessKeyIdKey": "AK", "secretAccessKeyKey": "SK"},
}
_POD = {
    "image": "registry.local/trainer:1",
    "imagePullPolicy": "Always",
    "imagePullSecrets": [{"name": "pull"}],
    "env": [
        {"name": "A", "value": "b"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}},
    ],
}
_SCHEDULING = {
    "nodeSelector": {"gpu": "a100"},
    "tolerations": [
        {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 60},
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule"},  # Exists -> Equal is valid, not back
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    "priorityClassName": "high",
    "schedulerName": "volcano",
}

_FTJ_FULL: dict[str, Any] = {
    "baseModel": {
        "uri": "hf://org/base",
        "revision": "v1",
        "dtype": "bfloat16",
        "trustRemoteCode": True,
        "initAdapter": {"uri": "s3://adapters/prev/"},
    },
    "dataset": {
        "train": {"uri": "s3://data/train.jsonl", "format": "instruction"},
        "validation": {"uri": "s3://data/val.jsonl", "format": "instruction"},
        "test": {"uri": "s3://data/test.jsonl", "format": "instruction"},
        "maxSeqLength": 512,
        "dedupe": "exact",
        "mixture": [{"uri": "s3://data/extra.jsonl", "format": "instruction", "weight": 0.5}],
        "replay": {"uri": "s3://data/replay.jsonl", "fraction": 0.2, "ewcLambda": 0.5},
        "augmentation": {
            "synonyms": {
                "fraction": 0.3,
                "variants": 2,
                "file": "s3://data/syn.txt",
                "includeResponse": True,
            },
            "paraphrase": {
                "variants": 2,
                "maxVariants": 100,
                "batchSize": 4,
                "maxNewTokens": 64,
                "includeResponse": True,
                "model": "hf://org/para",
                "prompt": "Rephrase: {text}",
            },
            "backTranslation": {
                "variants": 1,
                "maxVariants": 50,
                "batchSize": 4,
                "maxNewTokens": 64,
                "includeResponse": True,
                "model": "hf://org/en-de",
                "backModel": "hf://org/de-en",
                "prompt": "To German: {text}",
                "backPrompt": "To English: {text}",
            },
        },
    },
    "method": {
        "type": "lora",
        "lora": {
            "r": 16,
            "alpha": 32,
            "dropout": 0.1,
            "targetModules": ["q_proj", "v_proj"],
            "bias": "all",
            "useRslora": False,
        },
    },
    "hyperparameters": {
        "epochs": 2,
        "maxSteps": 1000,
        "learningRate": 1e-4,
        "batchSizePerDevice": 4,
        "gradientAccumulationSteps": 2,
        "warmupRatio": 0.05,
        "warmupSteps": 10,
        "scheduler": "linear",
        "weightDecay": 0.01,
        "maxGradNorm": 0.5,
        "precision": "bf16",
        "seed": 7,
        "gradientCheckpointing": True,
    },
    "evaluation": {
        "metrics": ["perplexity", "exact_match", "semantic_similarity"],
        "strategy": "steps",
        "everySteps": 50,
        "earlyStopping": {"metric": "eval_loss", "patience": 3, "threshold": 0.01},
        "semanticModel": "sentence-transformers/all-MiniLM-L6-v2",
    },
    "resources": {
        "nodes": 2,
        "gpusPerNode": 2,
        "gpuResourceName": "nvidia.com/gpu",
        "cpu": "8",
        "memory": "64Gi",
        "sharedMemorySize": "8Gi",
        **_SCHEDULING,
    },
    "distributed": {
        "strategy": "deepspeed",
        "deepspeed": {
            "zeroStage": 2,
            "offload": "optimizer",
            "config": {"zero_optimization": {"overlap_comm": True}},
        },
    },
    "checkpointing": {"everySteps": 100, "keepLast": 2, "resume": "never"},
    "storage": _STORAGE,
    "output": {"mergedModel": True},
    "tracking": {
        "reportTo": ["mlflow", "tensorboard"],
        "mlflow": {
            "trackingUri": "http://mlflow.mlflow.svc:5000",
            "experiment": "exp",
            "credentialsSecretRef": {"name": "ml", "usernameKey": "u", "passwordKey": "p", "tokenKey": "t"},
        },
    },
    "runPolicy": {
        "maxRestarts": 2,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
        "suspend": False,
        "queueName": "team-a",
    },
    "podMetadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
    **_POD,
}


def _ftj(**spec: Any) -> dict[str, Any]:
    base = {
        "baseModel": {"uri": "hf://org/base"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
        "resources": {"gpusPerNode": 1},
        "storage": {"uri": "s3://ckpt/runs"},
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": META,
        "spec": {**base, **spec},
    }


FTJ_FIXTURES = [
    {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": META, "spec": _FTJ_FULL},
    _ftj(
        baseModel={"uri": "hf://org/base", "initAdapter": {"fineTuneJobRef": {"name": "earlier"}}},
        dataset={"train": {"uri": "s3://data/train.jsonl"}, "validationSplit": 0.1, "packing": True},
        method={
            "type": "qlora",
            "qlora": {
                "r": 32,
                "alpha": 64,
                "dropout": 0.1,
                "targetModules": ["q_proj"],
                "bias": "all",
                "bits": 4,
                "quantType": "nf4",
                "doubleQuant": True,
                "useRslora": False,
                "computeDtype": "auto",
            },
        },
    ),
    _ftj(
        method={
            "type": "prefix",
            "prefix": {"numVirtualTokens": 10, "prefixProjection": True, "encoderHiddenSize": 128},
        }
    ),
    _ftj(method={"type": "full"}, distributed={"strategy": "ddp"}),
    _ftj(method={"type": "prompt", "prompt": {"numVirtualTokens": 10, "promptInitText": "Answer briefly."}}),
    _ftj(
        method={
            "type": "ptuning",
            "ptuning": {
                "numVirtualTokens": 10,
                "encoderReparameterizationType": "MLP",
                "encoderHiddenSize": 128,
            },
        }
    ),
]

_AD_FULL: dict[str, Any] = {
    "baseModel": {
        "uri": "hf://org/base",
        "revision": "v1",
        "dtype": "bfloat16",
        "trustRemoteCode": True,
        "servedName": "base",
    },
    "adapters": [
        {"name": "support", "source": "s3://adapters/support/", "rank": 16},
        {"name": "sql", "fineTuneJobRef": {"name": "sql-job"}},
        {"name": "best", "fineTuneSweepRef": {"name": "sweep"}},
    ],
    "runtime": "builtin",
    "hotReload": True,
    "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70},
    "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "cpu": "4", "memory": "16Gi"},
    **_SCHEDULING,
    "service": {"port": 8080, "type": "NodePort"},
    "storage": {k: v for k, v in _STORAGE.items() if k != "uri"},
    **_POD,
    "auth": {
        "apiKeySecretRef": {"name": "keys", "key": "api"},
        "adminKeySecretRef": {"name": "keys", "key": "admin"},
    },
    "networkPolicy": {
        "allowFrom": [
            {
                "namespaceSelector": {
                    "matchLabels": {"team": "a"},
                    "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}],
                },
                "podSelector": {
                    "matchLabels": {"app": "client"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}],
                },
            }
        ]
    },
}


def _adep(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "metadata": META, "spec": spec}


AD_FIXTURES = [
    _adep(_AD_FULL),
    _adep(
        {
            "baseModel": {"uri": "s3://models/base"},
            "adapters": [{"name": "support", "source": "s3://adapters/support/", "rank": 16}],
            "runtime": "vllm",
            "replicas": 2,
            "resources": {"gpus": 1},
            "auth": {"apiKeySecretRef": {"name": "keys", "key": "api"}},
            "vllm": {
                "image": "vllm/vllm:1",
                "maxLoras": 4,
                "maxLoraRank": 32,
                "extraArgs": ["--max-model-len", "4096"],
            },
        }
    ),
    # vLLM sizes its LoRA slots from the adapters' ranks when spec.vllm.maxLoraRank is not set.
    _adep(
        {
            "baseModel": {"uri": "hf://org/base"},
            "adapters": [{"name": "support", "source": "s3://adapters/support/", "rank": 16}],
            "runtime": "vllm",
            "resources": {"gpus": 1},
        }
    ),
]


_TEMPLATE: dict[str, Any] = {
    "baseModel": {"uri": "hf://org/base"},
    "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "validationSplit": 0.1},
    "method": {"type": "lora", "lora": {"alpha": 32}},
    "evaluation": {"metrics": ["exact_match"], "everySteps": 20},
    "storage": {"uri": "s3://ckpt/runs"},
}


def _sweep(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": META,
        "spec": {"template": _TEMPLATE, **spec},
    }


SWEEP_FIXTURES = [
    _sweep(
        parameters=[
            {"path": "hyperparameters.learningRate", "values": [1e-4, 3e-4]},
            {"path": "hyperparameters.scheduler", "choices": ["cosine", "linear"]},
            {"path": "method.lora.r", "min": 8, "max": 32, "step": 8},
        ],
        algorithm="grid",
        seed=3,
        maxTrials=5,
        parallelism=2,
        objective={"metric": "eval_loss", "direction": "minimize"},
        earlyStopping={"rule": "median", "startupTrials": 2, "warmupSteps": 10},
    ),
    _sweep(
        parameters=[
            {"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-3, "scale": "log"},
            {"path": "hyperparameters.warmupRatio", "min": 0.0, "max": 0.2},
        ],
        algorithm="random",
        seed=1,
        maxTrials=4,
        objective={"metric": "eval_loss"},
        earlyStopping={"rule": "successiveHalving", "minResource": 10, "reductionFactor": 3},
    ),
    # A rule whose other settings the other rule accepts too, so that the rule itself can change.
    _sweep(
        parameters=[{"path": "hyperparameters.learningRate", "values": [1e-4, 3e-4, 1e-3]}],
        objective={"metric": "eval_loss"},
        earlyStopping={"rule": "successiveHalving", "reductionFactor": 2},
    ),
    # Without earlyStopping the direction may be maximize (early stopping compares eval_loss).
    _sweep(
        parameters=[{"path": "hyperparameters.learningRate", "values": [1e-4, 3e-4, 1e-3]}],
        maxTrials=3,
        objective={"metric": "exact_match", "direction": "maximize"},
    ),
]


# ---------------------------------------------------------------------------------- rendering


def render_finetunejob(obj: dict[str, Any]) -> dict[str, Any]:
    """What the operator makes of a FineTuneJob: the trainer config and the first attempt's children."""
    ftj = load_finetunejob(obj).to_manifest()  # defaults filled in, as the API server stores it
    return {
        "trainer_config": to_config_dict(ftj),
        "job": fb.job(ftj, 1, SETTINGS),
        "service_account": fb.service_account(ftj),
        "role": fb.role(ftj),
        "role_binding": fb.role_binding(ftj),
        "service": fb.headless_service(ftj, SETTINGS),
    }


def render_adapterdeployment(obj: dict[str, Any]) -> dict[str, Any]:
    """What the operator makes of an AdapterDeployment. The references resolve through the cluster
    (allow-listed above): with no cluster here they resolve to nothing, the sources to themselves."""
    adep = load_adapterdeployment(obj).to_manifest()
    adapters = ar.resolve(_NoCluster(), adep).adapters
    return {
        "config_map": ab.config_map(adep, adapters),
        "service": ab.service(adep),
        "deployment": ab.deployment(adep, adapters, SETTINGS),
        "hpa": ab.hpa(adep),
        "network_policy": ab.network_policy(adep),
        "endpoint": ab.endpoint(adep),
    }


def render_finetunesweep(obj: dict[str, Any], trials: int = 3) -> dict[str, Any]:
    """What the operator makes of a FineTuneSweep: its first trials (as the reconcile asks the
    rebuilt study for each, the earlier ones running), the trial count and the study's pruner."""
    typed = load_finetunesweep(obj)
    sweep, spec = typed.to_manifest(), typed.spec
    params = study.parameters(spec)
    total = study.total_trials(spec, params)
    records: list[study.Record] = []
    jobs = []
    for number in range(min(total, trials)):
        chosen = study.ask(study.rebuild(spec, params, records, number))
        jobs.append(sb.trial_job(sweep, number, chosen))
        records.append(study.Record(number, chosen, "Running"))
    search = study.rebuild(spec, params, records, len(records))
    pruner = search.study.pruner
    return {
        "total_trials": total,
        "trials": jobs,
        "direction": search.study.direction.name,
        "pruner": (type(pruner).__name__, {k: repr(v) for k, v in vars(pruner).items()}),
    }


class _NoCluster:
    """A namespace without the referenced FineTuneJobs and FineTuneSweeps (they are not found)."""

    def get(self, *args: Any) -> None:
        return None


KINDS: dict[str, tuple[str, list[dict[str, Any]], Callable[[dict[str, Any]], Any], Callable[[dict], Any]]] = {
    "FineTuneJob": ("finetunejobs.yaml", FTJ_FIXTURES, render_finetunejob, load_finetunejob),
    "AdapterDeployment": (
        "adapterdeployments.yaml",
        AD_FIXTURES,
        render_adapterdeployment,
        load_adapterdeployment,
    ),
    "FineTuneSweep": ("finetunesweeps.yaml", SWEEP_FIXTURES, render_finetunesweep, load_finetunesweep),
}


# ---------------------------------------------------------------------------------- the schema walk


def spec_schema(crd_file: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def leaves(schema: dict[str, Any], path: str = "spec") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, schema) of every leaf: scalars, lists of scalars, maps and free-form objects.
    A list of objects is entered as `path[]` (its items' fields are the leaves)."""
    if schema.get("type") == "object" and "properties" in schema:
        for name, sub in schema["properties"].items():
            yield from leaves(sub, f"{path}.{name}")
    elif (
        schema.get("type") == "array"
        and schema["items"].get("type") == "object"
        and "properties" in schema["items"]
    ):
        yield from leaves(schema["items"], f"{path}[]")
    else:
        yield path, schema


def _steps(path: str) -> list[str]:
    return path.split(".")[1:]  # below "spec"


def locate(spec: Any, steps: list[str]) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (parent, key) where the path's leaf is set (each element of a list of objects)."""
    step, rest = steps[0], steps[1:]
    key = step.removesuffix("[]")
    if not isinstance(spec, dict) or key not in spec:
        return
    if not rest:
        yield spec, key
    elif step.endswith("[]"):
        for item in spec[key]:
            yield from locate(item, rest)
    else:
        yield from locate(spec[key], rest)


def _bump_quantity(value: str) -> list[str]:
    m = re.match(r"^(\d+)(.*)$", value)
    return [f"{int(m.group(1)) + 1}{m.group(2)}"] if m else []


def candidates(value: Any, schema: dict[str, Any]) -> list[Any]:
    """Other values for a leaf, the schema's own first; the API's validation picks the valid ones.
    `_OMIT` (leaving the field out) comes last: another value of a field must make a difference."""
    out: list[Any] = []
    if "enum" in schema:
        out += [v for v in schema["enum"] if v != value]
    elif isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        step = 1 if schema.get("type") == "integer" else value * 0.5 or 0.1
        out += [value + step, value - step, value * 2, lo, hi]
        if isinstance(lo, int | float) and isinstance(hi, int | float):
            out.append((lo + hi) / 2 if schema.get("type") != "integer" else (lo + hi) // 2)
    elif isinstance(value, str):
        out += _bump_quantity(value)
        stem = value.rstrip("/")
        out += [f"{stem}2" + ("/" if value.endswith("/") else ""), value + "-2", "x" + value, value.upper()]
    elif isinstance(value, list):
        out += [value[:-1], [*value, *value[-1:]], list(reversed(value))] if value else []
        out += [[c, *value[1:]] for c in candidates(value[0], schema.get("items") or {})] if value else []
    elif isinstance(value, dict):
        out += [{**value, "kubetune-test": "x"}, {k: v for k, v in list(value.items())[:-1]}]
    out.append(_OMIT)
    return [c for c in out if c is not None and c != value]


_OMIT = object()

# Valid values the schema cannot suggest (a rule, not an enum, decides them).
SAMPLES: dict[str, list[Any]] = {
    "spec.evaluation.earlyStopping.metric": ["perplexity", "exact_match"],
    "spec.parameters[].path": ["hyperparameters.weightDecay", "hyperparameters.warmupRatio"],
}


def _changed(doc: dict[str, Any], parent_path: list[str], key: str, new: Any, index: int) -> dict[str, Any]:
    """A copy of doc with the index-th occurrence of the leaf set to `new` (or left out)."""
    copied = copy.deepcopy(doc)
    parent, k = list(locate(copied["spec"], parent_path))[index]
    if new is _OMIT:
        del parent[k]
    else:
        parent[k] = new
    return copied


def effect_of(kind: str, path: str, schema: dict[str, Any]) -> str:
    """'read', 'unset' (no fixture sets it) or 'unread' (no valid change changes the output)."""
    _, fixtures, render, load = KINDS[kind]
    steps = _steps(path)
    found = False
    for doc in fixtures:
        for index, (parent, key) in enumerate(locate(doc["spec"], steps)):
            found = True
            before = render(doc)
            for new in [*SAMPLES.get(path, []), *candidates(parent[key], schema)]:
                changed = _changed(doc, steps, key, new, index)
                try:
                    load(changed)
                except InvalidManifestError:
                    continue  # not a valid manifest: the API server would refuse it
                if render(changed) != before:
                    return "read"
    return "unread" if found else "unset"


def _leaf_ids(kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    crd_file = KINDS[kind][0]
    return [
        (kind, path, schema)
        for path, schema in leaves(spec_schema(crd_file))
        if not (kind == "FineTuneSweep" and path.startswith(SWEEP_TEMPLATE))
    ]


ALL_LEAVES = [leaf for kind in KINDS for leaf in _leaf_ids(kind)]


def test_every_fixture_is_a_valid_manifest() -> None:
    for _, fixtures, render, load in KINDS.values():
        for doc in fixtures:
            load(doc)
            render(doc)


@pytest.mark.parametrize(("kind", "path", "schema"), ALL_LEAVES, ids=[f"{k}:{p}" for k, p, _ in ALL_LEAVES])
def test_every_spec_field_changes_what_the_operator_renders(
    kind: str, path: str, schema: dict[str, Any]
) -> None:
    effect = effect_of(kind, path, schema)
    assert effect != "unset", (
        f"{kind} {path}: no fixture in {Path(__file__).name} sets it; set it in a fixture so this test can "
        "check that the operator reads it"
    )
    if path in READ_BY_RECONCILE[kind]:
        assert effect == "unread", (
            f"{kind} {path} changes the rendered objects now: remove it from READ_BY_RECONCILE"
        )
    elif path in TO_WIRE[kind]:
        assert effect == "unread", f"{kind} {path} is read now: remove it from TO_WIRE"
    else:
        assert effect == "read", (
            f"{kind} {path} is accepted but nothing the operator renders depends on it (no valid change of "
            "it changes the trainer config or a child object): wire it, or remove it from the API"
        )


def test_a_sweep_template_reaches_every_trial() -> None:
    """Why the walk may skip spec.template: the template is the FineTuneJob spec of each trial (its
    schema is FineTuneJob's), changed only where the trial's parameters say."""

    def without_description(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in schema.items() if k != "description"}

    assert without_description(
        spec_schema("finetunesweeps.yaml")["properties"]["template"]
    ) == without_description(spec_schema("finetunejobs.yaml"))
    rendered = render_finetunesweep(SWEEP_FIXTURES[0])
    template = load_finetunesweep(SWEEP_FIXTURES[0]).to_manifest()["spec"]["template"]
    for trial in rendered["trials"]:
        params = sb.trial_params(trial)
        assert (
            params
            and trial["spec"]["hyperparameters"]["learningRate"] == params["hyperparameters.learningRate"]
        )
        unchanged = copy.deepcopy(trial["spec"])
        for path in params:  # put the template's values back: the rest is the template, verbatim
            *parents, leaf = path.split(".")
            src, dst = template, unchanged
            for key in parents:
                src, dst = src.get(key, {}), dst[key]
            if leaf in src:
                dst[leaf] = src[leaf]
            else:
                del dst[leaf]
        assert unchanged == template


def test_the_allow_lists_name_fields_the_api_has() -> None:
    paths = {(kind, path) for kind, path, _ in ALL_LEAVES}
    for kind, entries in READ_BY_RECONCILE.items():
        assert {(kind, p) for p in entries} <= paths
    for kind, entries in TO_WIRE.items():
        assert {(kind, p) for p in entries} <= paths


def test_the_walk_finds_an_unread_field() -> None:
    """The mechanism itself: a field the renders ignore is reported, one they read is not."""
    schema = {"type": "object", "properties": {"unused": {"type": "string"}}}
    KINDS["_Probe"] = (
        "",
        [{"spec": {"unused": "a", "used": 1}}],
        lambda doc: doc["spec"]["used"],
        lambda doc: doc,
    )
    try:
        assert effect_of("_Probe", "spec.unused", schema["properties"]["unused"]) == "unread"
        assert effect_of("_Probe", "spec.used", {"type": "integer"}) == "read"
        assert effect_of("_Probe", "spec.missing", {"type": "integer"}) == "unset"
    finally:
        del KINDS["_Probe"]
