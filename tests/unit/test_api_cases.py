"""The table of invalid manifests, and the client-side half of the check.

Each case is one mistake a user makes, the field the error must name, and the words that tell
the user what to fix. tests/integration/test_api_server.py sends the same table to the real
API server: client and server must both reject each case, naming the field and the fix.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubetune_operator.api import (
    InvalidManifestError,
    load_adapterdeployment,
    load_finetunejob,
    load_finetunesweep,
)

DELETE = object()


def finetunejob(name: str = "valid-job") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
            "storage": {"uri": "s3://runs/team-a", "secretRef": {"name": "s3-credentials"}},
        },
    }


def adapterdeployment(name: str = "valid-serve") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "adapters": [{"name": "support", "source": "s3://adapters/support/"}],
        },
    }


def finetunesweep(name: str = "valid-sweep") -> dict[str, Any]:
    template = finetunejob()["spec"]
    template["dataset"]["validationSplit"] = 0.1
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": template,
            "parameters": [{"path": "hyperparameters.learningRate", "values": [1e-4, 1e-3]}],
        },
    }


BASES = {"ftj": finetunejob, "adep": adapterdeployment, "fts": finetunesweep}


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge patch into a copy of base; DELETE removes a key, lists are replaced."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "ftj", "adep" or "fts"
    patch: dict[str, Any]
    path: str  # the field the error names
    fix: str  # the words that say what to fix (in the server's and the client's message)
    server: str | None = None  # instead of fix, where the API server's built-in wording differs
    client: str | None = None  # instead of fix, where pydantic's built-in wording differs
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self, name: str | None = None) -> dict[str, Any]:
        base = BASES[self.kind]()
        obj = merge(base, self.patch)
        if name and "name" not in self.patch.get("metadata", {}):
            obj["metadata"]["name"] = name
        return obj


def spec(**kw: Any) -> dict[str, Any]:
    return {"spec": kw}


def sweep(**kw: Any) -> dict[str, Any]:
    return {"spec": kw}


LONG_NAME = "a" * 64

INVALID: list[Case] = [
    # ---- method ----
    Case("lora-block-with-full", "ftj", spec(method={"type": "full", "lora": {"r": 8}}), "spec.method.lora",
         "method.lora only applies to method.type lora: remove method.lora or set method.type to lora"),
    Case("qlora-block-with-lora", "ftj", spec(method={"type": "lora", "qlora": {"bits": 4}}), "spec.method.qlora",
         "method.qlora only applies to method.type qlora"),
    Case("prefix-block-with-prompt", "ftj", spec(method={"type": "prompt", "prefix": {}}), "spec.method.prefix",
         "method.prefix only applies to method.type prefix"),
    Case("prompt-block-with-ptuning", "ftj", spec(method={"type": "ptuning", "prompt": {}}), "spec.method.prompt",
         "method.prompt only applies to method.type prompt"),
    Case("ptuning-block-with-lora", "ftj", spec(method={"ptuning": {"numVirtualTokens": 8}}), "spec.method.ptuning",
         "method.ptuning only applies to method.type ptuning"),
    Case("unknown-method", "ftj", spec(method={"type": "lorax"}), "spec.method.type", "lora",
         server='supported values: "lora", "qlora", "full", "prefix", "prompt", "ptuning"', client="Input should be"),
    Case("qlora-without-gpus", "ftj", spec(method={"type": "qlora"}, resources={"gpusPerNode": 0}),
         "spec.resources.gpusPerNode", "method.type qlora needs GPUs"),
    Case("qlora-with-zero3", "ftj",
         spec(method={"type": "qlora"}, distributed={"strategy": "deepspeed", "deepspeed": {"zeroStage": 3}}),
         "spec.distributed", "cannot shard its 4-bit weights with ZeRO-3"),
    Case("lora-rank-zero", "ftj", spec(method={"lora": {"r": 0}}), "spec.method.lora.r", "greater than or equal to 1"),
    Case("lora-dropout-one", "ftj", spec(method={"lora": {"dropout": 1}}), "spec.method.lora.dropout", "less than 1"),
    Case("qlora-bits-three", "ftj", spec(method={"type": "qlora", "qlora": {"bits": 3}}), "spec.method.qlora.bits",
         "4", server='supported values: "4", "8"', client="Input should be 4 or 8"),
    Case("lora-target-modules-empty", "ftj", spec(method={"lora": {"targetModules": []}}),
         "spec.method.lora.targetModules", "targetModules is an empty list: list module names"),
    Case("qlora-all-linear-with-others", "ftj",
         spec(method={"type": "qlora", "qlora": {"targetModules": ["all-linear", "q_proj"]}}),
         "spec.method.qlora.targetModules", "all-linear already covers every Linear layer; give it alone"),
    Case("unknown-field-typo", "ftj", spec(method={"lora": {"rank": 16}}), "spec.method.lora.rank", "unknown field",
         server='unknown field "spec.method.lora.rank"'),
    Case("unknown-top-level-block", "ftj", spec(hyperparameter={"learningRate": 0.001}), "spec.hyperparameter",
         "unknown field", server='unknown field "spec.hyperparameter"'),
    # ---- resources ----
    Case("zero-nodes", "ftj", spec(resources={"nodes": 0}), "spec.resources.nodes", "greater than or equal to 1"),
    Case("seventeen-gpus", "ftj", spec(resources={"gpusPerNode": 17}), "spec.resources.gpusPerNode",
         "less than or equal to 16"),
    Case("nodes-as-string", "ftj", spec(resources={"nodes": "2"}), "spec.resources.nodes", "integer",
         server="must be of type integer", client="Input should be a valid integer"),
    Case("bad-cpu-quantity", "ftj", spec(resources={"cpu": "lots"}), "spec.resources.cpu",
         "must be a Kubernetes quantity such as 4, 500m or 64Gi"),
    Case("bad-memory-unit", "ftj", spec(resources={"memory": "64GB"}), "spec.resources.memory",
         "must be a Kubernetes quantity"),
    Case("bad-gpu-resource-name", "ftj", spec(resources={"gpuResourceName": "nvidia gpu"}),
         "spec.resources.gpuResourceName", "must be an extended resource name such as nvidia.com/gpu"),
    Case("toleration-exists-with-value", "ftj",
         spec(resources={"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}),
         "spec.resources.tolerations[0].value", "remove value or use operator Equal"),
    Case("fp16-on-cpu", "ftj", spec(resources={"gpusPerNode": 0}, hyperparameters={"precision": "fp16"}),
         "spec.hyperparameters.precision", "precision fp16 needs GPUs"),
    # ---- distributed ----
    Case("zero-stage-four", "ftj", spec(distributed={"deepspeed": {"zeroStage": 4}}),
         "spec.distributed.deepspeed.zeroStage", "less than or equal to 3"),
    Case("deepspeed-block-with-ddp", "ftj",
         spec(distributed={"strategy": "ddp", "deepspeed": {"offload": "optimizer"}}), "spec.distributed.deepspeed",
         "only applies with strategy deepspeed: remove it or set distributed.strategy: deepspeed"),
    Case("offload-all-needs-zero3", "ftj", spec(distributed={"deepspeed": {"zeroStage": 2, "offload": "all"}}),
         "spec.distributed.deepspeed.offload", "offload all (parameters too) needs zeroStage 3"),
    Case("offload-needs-zero", "ftj", spec(distributed={"deepspeed": {"zeroStage": 0, "offload": "optimizer"}}),
         "spec.distributed.deepspeed.offload", "needs zeroStage 1 or more"),
    # ---- hyperparameters ----
    Case("zero-learning-rate", "ftj", spec(hyperparameters={"learningRate": 0}),
         "spec.hyperparameters.learningRate", "greater than 0"),
    Case("negative-learning-rate", "ftj", spec(hyperparameters={"learningRate": -1e-4}),
         "spec.hyperparameters.learningRate", "greater than 0"),
    Case("learning-rate-as-string", "ftj", spec(hyperparameters={"learningRate": "2e-4"}),
         "spec.hyperparameters.learningRate", "number", server="must be of type number",
         client="Input should be a valid number"),
    Case("zero-epochs", "ftj", spec(hyperparameters={"epochs": 0}), "spec.hyperparameters.epochs", "greater than 0"),
    # ---- data ----
    Case("no-training-data", "ftj", spec(dataset={"train": DELETE, "validationSplit": 0.1}), "spec.dataset",
         "dataset needs training data: set dataset.train.uri, or dataset.mixture"),
    Case("empty-mixture", "ftj", spec(dataset={"train": DELETE, "mixture": []}), "spec.dataset",
         "dataset needs training data: set dataset.train.uri, or dataset.mixture"),
    Case("unknown-data-format", "ftj", spec(dataset={"train": {"format": "sharegpt"}}), "spec.dataset.train.format",
         "instruction", server='supported values: "auto", "text", "instruction", "chat", "completion"',
         client="Input should be"),
    Case("max-seq-length-too-small", "ftj", spec(dataset={"maxSeqLength": 4}), "spec.dataset.maxSeqLength",
         "greater than or equal to 8"),
    Case("validation-split-too-big", "ftj", spec(dataset={"validationSplit": 0.6}), "spec.dataset.validationSplit",
         "less than or equal to 0.5"),
    Case("validation-split-zero", "ftj", spec(dataset={"validationSplit": 0}), "spec.dataset.validationSplit",
         "greater than 0"),
    Case("validation-and-split", "ftj",
         spec(dataset={"validation": {"uri": "s3://data/val.jsonl"}, "validationSplit": 0.1}),
         "spec.dataset.validationSplit", "set dataset.validation or dataset.validationSplit, not both"),
    Case("data-uri-with-space", "ftj", spec(dataset={"train": {"uri": "s3://data/my file.jsonl"}}),
         "spec.dataset.train.uri", "must be s3://bucket/key, pvc://claim/path, file:///path"),
    Case("packing-with-prefix", "ftj", spec(method={"type": "prefix"}, dataset={"packing": True}),
         "spec.dataset.packing", "dataset.packing does not work with virtual-token methods"),
    Case("replay-fraction-one", "ftj", spec(dataset={"replay": {"uri": "s3://data/old.jsonl", "fraction": 1.0}}),
         "spec.dataset.replay.fraction", "less than 1"),
    Case("ewc-with-zero3", "ftj",
         spec(dataset={"replay": {"uri": "s3://data/old.jsonl", "ewcLambda": 0.5}},
              distributed={"deepspeed": {"zeroStage": 3}}),
         "spec.dataset.replay.ewcLambda", "does not work with ZeRO-3"),
    # ---- continuing an adapter (baseModel.initAdapter) ----
    Case("init-adapter-uri-and-job", "ftj",
         spec(baseModel={"initAdapter": {"uri": "s3://runs/a/final/", "fineTuneJobRef": {"name": "task-1"}}}),
         "spec.baseModel.initAdapter", "needs exactly one of uri"),
    Case("init-adapter-empty", "ftj", spec(baseModel={"initAdapter": {}}),
         "spec.baseModel.initAdapter", "needs exactly one of uri"),
    Case("init-adapter-bad-uri", "ftj", spec(baseModel={"initAdapter": {"uri": "gs://runs/a/final/"}}),
         "spec.baseModel.initAdapter.uri", "baseModel.initAdapter.uri must be hf://org/name, s3://bucket/path"),
    Case("init-adapter-with-full", "ftj",
         spec(baseModel={"initAdapter": {"fineTuneJobRef": {"name": "task-1"}}}, method={"type": "full"}),
         "spec.baseModel.initAdapter", "method.type full trains no adapter"),
    Case("mixture-weight-zero", "ftj",
         spec(dataset={"train": DELETE, "mixture": [{"uri": "s3://data/a.jsonl", "weight": 0}]}),
         "spec.dataset.mixture[0].weight", "greater than 0"),
    Case("augmentation-without-method", "ftj", spec(dataset={"augmentation": {}}), "spec.dataset.augmentation",
         "dataset.augmentation needs at least one method: set synonyms, paraphrase or backTranslation"),
    Case("augmentation-synonym-fraction-zero", "ftj", spec(dataset={"augmentation": {"synonyms": {"fraction": 0}}}),
         "spec.dataset.augmentation.synonyms.fraction", "greater than 0"),
    Case("augmentation-too-many-variants", "ftj",
         spec(dataset={"augmentation": {"synonyms": {"variants": 17}}}),
         "spec.dataset.augmentation.synonyms.variants", "less than or equal to 16"),
    Case("augmentation-synonyms-file-with-space", "ftj",
         spec(dataset={"augmentation": {"synonyms": {"file": "s3://data/my synonyms.txt"}}}),
         "spec.dataset.augmentation.synonyms.file", "must be s3://bucket/key, pvc://claim/path, file:///path"),
    Case("augmentation-paraphrase-model-without-scheme", "ftj",
         spec(dataset={"augmentation": {"paraphrase": {"model": "Vamsi/T5_Paraphrase_Paws"}}}),
         "spec.dataset.augmentation.paraphrase.model", "must be hf://org/name, s3://bucket/path"),
    Case("augmentation-prompt-without-text", "ftj",
         spec(dataset={"augmentation": {"paraphrase": {"model": "hf://org/para", "prompt": "paraphrase:"}}}),
         "spec.dataset.augmentation.paraphrase.prompt", "must contain {text}, where the text to rewrite goes"),
    Case("augmentation-cap-below-variants", "ftj",
         spec(dataset={"augmentation": {"paraphrase": {"model": "hf://org/para", "variants": 4, "maxVariants": 2}}}),
         "spec.dataset.augmentation.paraphrase.maxVariants", "maxVariants is below variants"),
    Case("augmentation-back-translation-without-back-model", "ftj",
         spec(dataset={"augmentation": {"backTranslation": {"model": "hf://org/en-de"}}}),
         "spec.dataset.augmentation.backTranslation.backModel", "required", server="Required value",
         client="Field required"),
    # ---- evaluation ----
    Case("early-stopping-without-validation", "ftj", spec(evaluation={"earlyStopping": {"patience": 2}}),
         "spec.evaluation.earlyStopping", "evaluation.earlyStopping needs validation data"),
    Case("early-stopping-metric-not-computed", "ftj",
         spec(dataset={"validationSplit": 0.1}, evaluation={"earlyStopping": {"metric": "bleu"}}),
         "spec.evaluation.earlyStopping.metric", "add the metric to evaluation.metrics"),
    Case("early-stopping-without-evaluations", "ftj",
         spec(dataset={"validationSplit": 0.1}, evaluation={"strategy": "no", "earlyStopping": {}}),
         "spec.evaluation.earlyStopping", "set evaluation.strategy to auto, steps or epoch"),
    Case("early-stopping-on-confusion-matrix", "ftj",
         spec(dataset={"validationSplit": 0.1},
              evaluation={"metrics": ["accuracy", "confusion_matrix"], "earlyStopping": {"metric": "confusion_matrix"}}),
         "spec.evaluation.earlyStopping.metric", "confusion_matrix is a matrix, not a number"),
    Case("early-stopping-on-rouge", "ftj",
         spec(dataset={"validationSplit": 0.1}, evaluation={"metrics": ["rouge"], "earlyStopping": {"metric": "rouge"}}),
         "spec.evaluation.earlyStopping.metric", "rouge is logged as rouge1/rouge2/rougeL"),
    Case("early-stopping-on-a-typo", "ftj",
         spec(dataset={"validationSplit": 0.1}, evaluation={"earlyStopping": {"metric": "eval_los"}}),
         "spec.evaluation.earlyStopping.metric", "must be a number evaluation logs: eval_loss"),
    Case("semantic-similarity-without-model", "ftj",
         spec(evaluation={"metrics": ["semantic_similarity"]}),
         "spec.evaluation.semanticModel", "semantic_similarity needs evaluation.semanticModel"),
    Case("early-stopping-checkpoints-between-evaluations", "ftj",
         spec(dataset={"validationSplit": 0.1}, checkpointing={"everySteps": 150},
              evaluation={"everySteps": 100, "earlyStopping": {}}),
         "spec.checkpointing.everySteps", "make checkpointing.everySteps a multiple of evaluation.everySteps"),
    Case("early-stopping-step-checkpoints-epoch-evaluations", "ftj",
         spec(dataset={"validationSplit": 0.1}, checkpointing={"everySteps": 100},
              evaluation={"strategy": "epoch", "earlyStopping": {}}),
         "spec.checkpointing.everySteps", "needs checkpoints every epoch: remove checkpointing.everySteps"),
    Case("steps-without-every-steps", "ftj", spec(evaluation={"strategy": "steps"}), "spec.evaluation.everySteps",
         "evaluation.strategy steps needs evaluation.everySteps"),
    Case("unknown-metric", "ftj", spec(evaluation={"metrics": ["perplexity", "bleurt"]}), "spec.evaluation.metrics[1]",
         "bleu", server='Unsupported value: "bleurt": supported values: "perplexity", "bleu"', client="Input should be"),
    # ---- tracking ----
    Case("unknown-tracker", "ftj", spec(tracking={"reportTo": ["tensorbord"]}), "spec.tracking.reportTo[0]",
         "tensorboard", server='Unsupported value: "tensorbord": supported values: "tensorboard", "mlflow"',
         client="Input should be"),
    Case("mlflow-without-server", "ftj", spec(tracking={"reportTo": ["mlflow"]}), "spec.tracking.mlflow",
         "tracking.reportTo mlflow needs a server: set tracking.mlflow.trackingUri"),
    Case("mlflow-server-without-report-to", "ftj", spec(tracking={"mlflow": {"trackingUri": "http://mlflow:5000"}}),
         "spec.tracking.reportTo", "add mlflow to tracking.reportTo"),
    Case("mlflow-uri-not-http", "ftj",
         spec(tracking={"reportTo": ["mlflow"], "mlflow": {"trackingUri": "mlflow.example.com"}}),
         "spec.tracking.mlflow.trackingUri", "tracking.mlflow.trackingUri must be an http:// or https:// URL"),
    Case("mlflow-credentials-in-uri", "ftj",
         spec(tracking={"reportTo": ["mlflow"], "mlflow": {"trackingUri": "https://bob:hunter2@mlflow.example.com"}}),
         "spec.tracking.mlflow.trackingUri", "must not contain credentials (user:password@): put them in a Secret"),
    Case("mlflow-secret-name-invalid", "ftj",
         spec(tracking={"reportTo": ["mlflow"],
                        "mlflow": {"trackingUri": "http://mlflow:5000", "credentialsSecretRef": {"name": "MLflow_Creds"}}}),
         "spec.tracking.mlflow.credentialsSecretRef.name", "must be the name of a Secret"),
    # ---- storage and outputs ----
    Case("storage-not-s3", "ftj", spec(storage={"uri": "https://bucket.example.com/runs"}), "spec.storage.uri",
         "storage.uri must look like s3://bucket or s3://bucket/prefix"),
    Case("storage-bucket-uppercase", "ftj", spec(storage={"uri": "s3://My_Bucket/runs"}), "spec.storage.uri",
         "storage.uri must look like s3://bucket"),
    Case("storage-missing", "ftj", spec(storage=DELETE), "spec.storage", "required",
         server="Required value", client="Field required"),
    Case("endpoint-without-scheme", "ftj", spec(storage={"endpoint": "minio:9000"}), "spec.storage.endpoint",
         "storage.endpoint must be an http:// or https:// URL"),
    Case("secret-name-invalid", "ftj", spec(storage={"secretRef": {"name": "S3_Creds"}}),
         "spec.storage.secretRef.name", "secretRef.name must be the name of a Secret"),
    Case("base-model-bad-scheme", "ftj", spec(baseModel={"uri": "gs://models/llama"}), "spec.baseModel.uri",
         "baseModel.uri must be hf://org/name, s3://bucket/path, pvc://claim/path or file:///path"),
    Case("merged-model-with-prefix", "ftj", spec(method={"type": "prefix"}, output={"mergedModel": True}),
         "spec.output.mergedModel", "works only with method.type lora or qlora"),
    # ---- pods and policy ----
    Case("reserved-env-name", "ftj", spec(env=[{"name": "KUBETUNE_CONFIG", "value": "x"}]), "spec.env[0].name",
         "env names starting with KUBETUNE_ are reserved"),
    Case("env-value-and-value-from", "ftj",
         spec(env=[{"name": "TOKEN", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
         "spec.env[0]", "takes value or valueFrom, not both"),
    Case("queue-name-invalid", "ftj", spec(runPolicy={"queueName": "Team A"}), "spec.runPolicy.queueName",
         "must be the name of a Kueue LocalQueue"),
    Case("negative-max-restarts", "ftj", spec(runPolicy={"maxRestarts": -1}), "spec.runPolicy.maxRestarts",
         "greater than or equal to 0"),
    Case("too-many-restarts", "ftj", spec(runPolicy={"maxRestarts": 101}), "spec.runPolicy.maxRestarts",
         "less than or equal to 100"),
    Case("job-name-too-long", "ftj", {"metadata": {"name": LONG_NAME}}, "metadata.name",
         "must be at most 63 characters"),
    # ---- AdapterDeployment ----
    Case("duplicate-adapter-names", "adep",
         spec(adapters=[{"name": "a", "source": "s3://x/a/"}, {"name": "a", "source": "s3://x/b/"}]),
         "spec.adapters", "adapter names must be unique"),
    Case("adapter-with-both-sources", "adep",
         spec(adapters=[{"name": "a", "source": "s3://x/a/", "fineTuneJobRef": {"name": "job"}}]),
         "spec.adapters[0]", "each adapter needs exactly one of source"),
    Case("adapter-without-source", "adep", spec(adapters=[{"name": "a"}]), "spec.adapters[0]",
         "each adapter needs exactly one of source"),
    Case("adapter-name-not-dns", "adep", spec(adapters=[{"name": "Support_Bot", "source": "s3://x/a/"}]),
         "spec.adapters[0].name", "adapter name must be a DNS-1123 label"),
    Case("adapter-source-ftp", "adep", spec(adapters=[{"name": "a", "source": "ftp://x/a/"}]),
         "spec.adapters[0].source", "adapter source must be s3://bucket/path"),
    Case("replicas-and-autoscaling", "adep", spec(replicas=2, autoscaling={"maxReplicas": 4}), "spec.replicas",
         "set replicas or autoscaling, not both"),
    Case("autoscaling-max-below-min", "adep", spec(autoscaling={"minReplicas": 3, "maxReplicas": 2}),
         "spec.autoscaling.maxReplicas", "maxReplicas must be >= autoscaling.minReplicas"),
    Case("autoscaling-without-max", "adep", spec(autoscaling={"minReplicas": 1}), "spec.autoscaling.maxReplicas",
         "required", server="Required value", client="Field required"),
    Case("unknown-runtime", "adep", spec(runtime="tgi"), "spec.runtime", "builtin",
         server='supported values: "builtin", "vllm"', client="Input should be"),
    Case("vllm-without-gpu", "adep", spec(runtime="vllm"), "spec.resources.gpus", "runtime vllm needs a GPU"),
    Case("vllm-block-with-builtin", "adep", spec(vllm={"maxLoras": 2}), "spec.vllm",
         "spec.vllm only applies to runtime vllm"),
    Case("service-port-out-of-range", "adep", spec(service={"port": 70000}), "spec.service.port",
         "less than or equal to 65535"),
    Case("adapterdeployment-name-too-long", "adep", {"metadata": {"name": LONG_NAME}}, "metadata.name",
         "must be at most 63 characters"),
    # ---- FineTuneSweep ----
    Case("sweep-unknown-path", "fts", sweep(parameters=[{"path": "hyperparameters.learningrate", "values": [1e-4]}]),
         "spec.parameters[0].path", "must be a tunable field of the FineTuneJob spec"),
    Case("sweep-path-not-a-scalar", "fts", sweep(parameters=[{"path": "method.lora", "values": [8]}]),
         "spec.parameters[0].path", "must be a tunable field of the FineTuneJob spec"),
    Case("sweep-no-parameters", "fts", sweep(parameters=[]), "spec.parameters", "at least 1",
         server="should have at least 1 items", client="at least 1 item"),
    Case("sweep-empty-values", "fts", sweep(parameters=[{"path": "method.lora.r", "values": []}]),
         "spec.parameters[0].values", "at least 1", server="should have at least 1 items", client="at least 1 item"),
    Case("sweep-values-and-range", "fts",
         sweep(parameters=[{"path": "hyperparameters.learningRate", "values": [1e-4], "min": 1e-5, "max": 1e-3}]),
         "spec.parameters[0]", "needs exactly one of values"),
    Case("sweep-nothing-to-try", "fts", sweep(parameters=[{"path": "hyperparameters.learningRate"}]),
         "spec.parameters[0]", "needs exactly one of values"),
    Case("sweep-min-without-max", "fts", sweep(parameters=[{"path": "hyperparameters.learningRate", "min": 1e-5}]),
         "spec.parameters[0].max", "a range needs both min and max"),
    Case("sweep-min-above-max", "fts",
         sweep(parameters=[{"path": "hyperparameters.learningRate", "min": 1e-3, "max": 1e-5}]),
         "spec.parameters[0].max", "min must be below max"),
    Case("sweep-log-from-zero", "fts",
         sweep(parameters=[{"path": "hyperparameters.warmupRatio", "min": 0, "max": 0.2, "scale": "log"}],
               algorithm="random", maxTrials=4),
         "spec.parameters[0].min", "scale log needs min > 0"),
    Case("sweep-step-on-values", "fts", sweep(parameters=[{"path": "method.lora.r", "values": [8, 16], "step": 8}]),
         "spec.parameters[0].step", "step only applies to a range"),
    Case("sweep-string-path-with-values", "fts", sweep(parameters=[{"path": "hyperparameters.scheduler", "values": [1]}]),
         "spec.parameters[0].path", "this path takes strings: list them under choices"),
    Case("sweep-number-path-with-choices", "fts", sweep(parameters=[{"path": "method.lora.r", "choices": ["8"]}]),
         "spec.parameters[0].choices", "this path takes numbers"),
    Case("sweep-choice-not-accepted", "fts",
         sweep(parameters=[{"path": "hyperparameters.scheduler", "choices": ["cosine", "exponential"]}]),
         "spec.parameters[0].choices", "choices must be values the field accepts"),
    Case("sweep-fractional-rank", "fts", sweep(parameters=[{"path": "method.lora.r", "values": [8, 12.5]}]),
         "spec.parameters[0].path", "this path is an integer"),
    Case("sweep-duplicate-path", "fts",
         sweep(parameters=[{"path": "method.lora.r", "values": [8]}, {"path": "method.lora.r", "values": [16]}]),
         "spec.parameters[1]", "Duplicate value", server="Duplicate value"),
    Case("sweep-grid-range-without-step", "fts",
         sweep(parameters=[{"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-3}]),
         "spec.parameters", "algorithm grid needs a finite set for every parameter"),
    Case("sweep-random-without-max-trials", "fts", sweep(algorithm="random"), "spec.maxTrials",
         "algorithms random and tpe need maxTrials"),
    Case("sweep-parallelism-above-max-trials", "fts", sweep(maxTrials=2, parallelism=3), "spec.parallelism",
         "parallelism must be at most maxTrials"),
    Case("sweep-objective-typo", "fts", sweep(objective={"metric": "eval_los"}), "spec.objective.metric",
         "objective.metric must be a number the trainer reports"),
    Case("sweep-objective-not-computed", "fts", sweep(objective={"metric": "exact_match", "direction": "maximize"}),
         "spec.objective.metric", "add it to template.evaluation.metrics"),
    Case("sweep-without-validation-data", "fts", sweep(template={"dataset": {"validationSplit": DELETE}}),
         "spec.template.dataset", "a sweep compares trials on validation data"),
    Case("sweep-early-stopping-on-exact-match", "fts",
         sweep(template={"evaluation": {"metrics": ["exact_match"]}}, earlyStopping={},
               objective={"metric": "exact_match", "direction": "maximize"}),
         "spec.earlyStopping", "set objective.metric to eval_loss"),
    Case("sweep-startup-trials-with-halving", "fts",
         sweep(earlyStopping={"rule": "successiveHalving", "startupTrials": 2}), "spec.earlyStopping.startupTrials",
         "startupTrials belongs to the median rule"),
    Case("sweep-lora-path-with-full", "fts",
         sweep(template={"method": {"type": "full"}}, parameters=[{"path": "method.lora.r", "values": [8, 16]}]),
         "spec.parameters", "a parameter under method.lora needs template.method.type lora"),
    Case("sweep-template-invalid", "fts", sweep(template={"method": {"type": "full", "lora": {"r": 8}}}),
         "spec.template.method.lora", "method.lora only applies to method.type lora"),
    Case("sweep-template-suspended", "fts", sweep(template={"runPolicy": {"suspend": True}}),
         "spec.template.runPolicy.suspend", "would start every trial suspended"),
    Case("sweep-dropout-out-of-bounds", "fts", sweep(parameters=[{"path": "method.lora.dropout", "values": [0.1, 1.0]}]),
         "spec.parameters[0].path", "method.lora.dropout takes values >= 0 and < 1"),
    Case("sweep-learning-rate-range-from-zero", "fts",
         sweep(algorithm="random", maxTrials=4, parameters=[{"path": "hyperparameters.learningRate", "min": 0, "max": 0.01}]),
         "spec.parameters[0].path", "hyperparameters.learningRate takes values > 0 and <= 1"),
    Case("sweep-too-many-trials", "fts", sweep(algorithm="random", maxTrials=1001), "spec.maxTrials",
         "less than or equal to 1000"),
    Case("sweep-name-too-long", "fts", {"metadata": {"name": "s" * 60}}, "metadata.name",
         "must be at most 59 characters"),
    Case("auth-without-api-key-secret", "adep", spec(auth={}), "spec.auth.apiKeySecretRef",
         "required", server="Required value", client="Field required"),
    Case("auth-secret-name-not-dns", "adep", spec(auth={"apiKeySecretRef": {"name": "Serve_Keys"}}),
         "spec.auth.apiKeySecretRef.name", "the Secret name must be a lowercase DNS subdomain"),
    Case("admin-key-with-vllm", "adep",
         spec(runtime="vllm", resources={"gpus": 1},
              auth={"apiKeySecretRef": {"name": "keys"}, "adminKeySecretRef": {"name": "admin"}}),
         "spec.auth.adminKeySecretRef", "adminKeySecretRef applies to runtime builtin only"),
    Case("network-policy-peer-without-selector", "adep", spec(networkPolicy={"allowFrom": [{}]}),
         "spec.networkPolicy.allowFrom[0]", "needs a namespaceSelector, a podSelector or both"),
]  # fmt: skip

# Near misses: manifests right beside a rule's edge that both the client and the API server
# must accept (a rule that rejects them is wrong, not strict).
SPLIT = {"validationSplit": 0.1}
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("early-stopping-checkpoints-every-second-evaluation",
     spec(dataset=SPLIT, checkpointing={"everySteps": 200}, evaluation={"everySteps": 100, "earlyStopping": {}})),
    ("early-stopping-checkpoints-follow-step-evaluations",
     spec(dataset=SPLIT, evaluation={"strategy": "steps", "everySteps": 50, "earlyStopping": {}})),
    ("early-stopping-every-epoch",
     spec(dataset=SPLIT, evaluation={"strategy": "epoch", "metrics": ["accuracy"], "earlyStopping": {"metric": "accuracy"}})),
    ("step-checkpoints-without-early-stopping",
     spec(dataset=SPLIT, checkpointing={"everySteps": 150}, evaluation={"everySteps": 100})),
    # resources.nodes / gpusPerNode are immutable (transition rules): a new job may still pick any size.
    ("two-nodes-by-eight-gpus-on-create", spec(resources={"nodes": 2, "gpusPerNode": 8})),
    ("cpu-training-on-create", spec(resources={"nodes": 1, "gpusPerNode": 0})),
    ("all-linear-alone", spec(method={"lora": {"targetModules": ["all-linear"], "useRslora": True}})),
    ("qlora-compute-dtype-and-load-dtype",
     spec(baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B", "dtype": "bfloat16"},
          method={"type": "qlora", "qlora": {"computeDtype": "bf16", "targetModules": ["q_proj", "v_proj"]}})),
    ("early-stopping-on-rougeL-computed-by-rouge",
     spec(dataset=SPLIT, evaluation={"metrics": ["rouge"], "earlyStopping": {"metric": "eval_rougeL"}})),
    ("semantic-similarity-with-its-model",
     spec(evaluation={"metrics": ["semantic_similarity"], "semanticModel": "sentence-transformers/all-MiniLM-L6-v2"})),
    ("tensorboard-without-mlflow", spec(tracking={"reportTo": ["tensorboard"]})),
    ("mlflow-with-server-and-secret",
     spec(tracking={"reportTo": ["tensorboard", "mlflow"],
                    "mlflow": {"trackingUri": "https://mlflow.example.com/team@a", "experiment": "support-bot",
                               "credentialsSecretRef": {"name": "mlflow-credentials"}}})),
    ("confusion-matrix-computed-early-stopping-on-f1",
     spec(dataset=SPLIT, evaluation={"metrics": ["f1", "confusion_matrix"], "earlyStopping": {"metric": "eval_f1"}})),
    ("augmentation-with-all-three-methods",
     spec(dataset={"augmentation": {
         "synonyms": {"fraction": 0.2, "variants": 2, "file": "s3://data/synonyms.txt"},
         "paraphrase": {"model": "s3://models/paraphraser", "variants": 2, "maxVariants": 2,
                        "prompt": "paraphrase: {text}"},
         "backTranslation": {"model": "hf://Helsinki-NLP/opus-mt-en-de", "backModel": "hf://Helsinki-NLP/opus-mt-de-en"},
     }})),
]  # fmt: skip


# Stepped sweep ranges: float steps that land on max only within rounding (0.3 / 0.1 = 2.9999...).
ACCEPTED_SWEEPS: list[tuple[str, dict[str, Any]]] = [
    ("float-step-lands-on-max", sweep(parameters=[{"path": "hyperparameters.warmupRatio", "min": 0, "max": 0.3, "step": 0.1}])),
    ("small-step-lands-on-max",
     sweep(parameters=[{"path": "hyperparameters.learningRate", "min": 1e-5, "max": 1e-4, "step": 1e-5}])),
    ("integer-step-grid", sweep(parameters=[{"path": "method.lora.r", "min": 8, "max": 32, "step": 8}])),
    # A max off the grid is accepted (the grid stops below it, as the Python search space does).
    ("max-off-the-step-grid", sweep(parameters=[{"path": "method.lora.r", "min": 8, "max": 30, "step": 8}])),
]  # fmt: skip


def accepted(patch: dict[str, Any], name: str = "valid-job") -> dict[str, Any]:
    return merge(finetunejob(name), patch)


def accepted_sweep(patch: dict[str, Any], name: str = "valid-sweep") -> dict[str, Any]:
    return merge(finetunesweep(name), patch)


LOADERS = {"ftj": load_finetunejob, "adep": load_adapterdeployment, "fts": load_finetunesweep}


def client_error(case: Case) -> str:
    with pytest.raises(InvalidManifestError) as info:
        LOADERS[case.kind](case.manifest())
    return str(info.value)


def test_table_is_big_and_ids_unique() -> None:
    assert len(INVALID) >= 30
    assert len({c.id for c in INVALID}) == len(INVALID)


def test_the_valid_bases_are_valid() -> None:
    load_finetunejob(finetunejob())
    load_adapterdeployment(adapterdeployment())
    load_finetunesweep(finetunesweep())


@pytest.mark.parametrize(("id_", "patch"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_client_accepts_near_misses(id_: str, patch: dict[str, Any]) -> None:
    load_finetunejob(accepted(patch))


@pytest.mark.parametrize(("id_", "patch"), ACCEPTED_SWEEPS, ids=[a[0] for a in ACCEPTED_SWEEPS])
def test_client_accepts_sweep_near_misses(id_: str, patch: dict[str, Any]) -> None:
    load_finetunesweep(accepted_sweep(patch))


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_client_rejects_naming_field_and_fix(case: Case) -> None:
    message = client_error(case)
    # Lines read "  <field path>: <message>", like the API server's.
    assert f"  {case.path}: " in message, message
    assert (case.client or case.fix) in message, message
