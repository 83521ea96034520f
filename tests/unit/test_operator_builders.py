"""Pure builders: FineTuneJob / AdapterDeployment specs -> manifests (no cluster)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from kubetune_operator import meta
from kubetune_operator.adapterdeployment import builders as ab
from kubetune_operator.api.finetunejob import Method, OutputStatus
from kubetune_operator.convert import finetunejob_to_config, to_config_dict
from kubetune_operator.finetunejob import builders as fb
from kubetune_operator.settings import Settings

SETTINGS = Settings(
    trainer_image="kubetune/trainer:test",
    vllm_image="vllm/vllm-openai:test",
    image_pull_policy="IfNotPresent",
    default_s3_endpoint="",
    default_s3_region="us-east-1",
    default_s3_secret="",
    termination_grace_seconds=300,
)


def ftj(**spec_overrides) -> dict:
    spec = {
        "baseModel": {"uri": "s3://models/llama-1b", "trustRemoteCode": False},
        "dataset": {"train": {"uri": "s3://data/train.jsonl", "format": "auto"}, "maxSeqLength": 512},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "bias": "none"}},
        "hyperparameters": {"epochs": 1, "learningRate": 2e-4, "batchSizePerDevice": 4},
        "resources": {"nodes": 1, "gpusPerNode": 1, "gpuResourceName": "nvidia.com/gpu"},
        "distributed": {"strategy": "deepspeed", "deepspeed": {"zeroStage": 2, "offload": "none"}},
        "checkpointing": {"everySteps": 100, "keepLast": 2, "resume": "auto"},
        "storage": {
            "uri": "s3://ckpt/runs",
            "endpoint": "http://minio:9000",
            "secretRef": {"name": "s3-creds"},
        },
        "runPolicy": {"maxRestarts": 3},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "llama-lora", "namespace": "team-a", "uid": "u-123", "generation": 1},
        "spec": spec,
    }


def test_every_child_is_owned_and_labelled_without_copying_parent_labels() -> None:
    parent = ftj()
    parent["metadata"]["labels"] = {"argocd.argoproj.io/instance": "my-app", "team": "a"}
    children = [
        fb.service_account(parent),
        fb.role(parent),
        fb.role_binding(parent),
        fb.config_map(parent, {"model_name": "x"}),
        fb.headless_service(parent, SETTINGS),
        fb.job(parent, 1, SETTINGS),
    ]
    for child in children:
        [owner] = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "llama-lora",
            "uid": "u-123",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = child["metadata"]["labels"]
        assert labels[meta.LABEL_FINETUNEJOB] == "llama-lora"
        assert labels[meta.LABEL_MANAGED_BY] == "kubetune-operator"
        assert "argocd.argoproj.io/instance" not in labels and "team" not in labels


def test_role_allows_patching_only_this_jobs_status() -> None:
    [rule] = fb.role(ftj())["rules"]
    assert rule == {
        "apiGroups": ["kubetune.io"],
        "resources": ["finetunejobs/status"],
        "resourceNames": ["llama-lora"],
        "verbs": ["patch"],
    }
    rb = fb.role_binding(ftj())
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "llama-lora-trainer", "namespace": "team-a"}]


def test_two_nodes_by_eight_gpus_renders_an_indexed_job_with_torchrun_rendezvous_at_pod_0() -> None:
    job = fb.job(ftj(resources={"nodes": 2, "gpusPerNode": 8, "sharedMemorySize": "64Gi"}), 1, SETTINGS)
    spec = job["spec"]
    assert job["metadata"]["name"] == "llama-lora-1"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        2,
        2,
        0,
    )
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "llama-lora-workers"
    [c] = pod["containers"]
    assert c["command"] == [
        "python",
        "-m",
        "kubetune_trainer.launch",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=llama-lora-1-0.llama-lora-workers.team-a.svc",
        "--master-port=29500",
        "--rdzv-conf=timeout=1800",
        "-m",
        "kubetune_trainer",
        "train",
        "--config",
        "/etc/kubetune/config.yaml",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_single_node_uses_standalone_rendezvous() -> None:
    [c] = fb.job(ftj(), 1, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert c["command"][:6] == [
        "python", "-m", "kubetune_trainer.launch", "--nnodes=1", "--nproc-per-node=1", "--standalone",
    ]  # fmt: skip


def test_cpu_training_requests_no_gpu() -> None:
    [c] = fb.job(ftj(resources={"nodes": 1, "gpusPerNode": 0, "cpu": "4", "memory": "16Gi"}), 1, SETTINGS)[
        "spec"
    ]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}


def test_operator_defaults_fill_the_resources_a_spec_leaves_out() -> None:
    defaults = dataclasses.replace(
        SETTINGS, default_trainer_cpu="8", default_trainer_memory="64Gi", default_trainer_shm="16Gi"
    )

    def pod(resources: dict) -> tuple[dict, dict]:
        p = fb.job(ftj(resources=resources), 1, defaults)["spec"]["template"]["spec"]
        [shm] = [v for v in p["volumes"] if v["name"] == "dshm"]
        return p["containers"][0]["resources"], shm["emptyDir"]

    res, shm = pod({"nodes": 1, "gpusPerNode": 1})
    assert res["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert res["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
    assert shm == {"medium": "Memory", "sizeLimit": "16Gi"}
    # What the spec says wins over the operator's defaults.
    res, shm = pod({"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "8Gi", "sharedMemorySize": "1Gi"})
    assert res["requests"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert shm["sizeLimit"] == "1Gi"
    # No defaults configured: nothing is invented.
    res = fb.job(ftj(), 1, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "cpu" not in res["requests"] and "memory" not in res["requests"]


def test_pods_are_locked_down() -> None:
    pod = fb.job(ftj(), 1, SETTINGS)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    [c] = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_credentials_only_through_secret_key_refs() -> None:
    job = fb.job(ftj(), 1, SETTINGS)
    [c] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[var]
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": var}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    rendered = yaml.safe_dump(fb.config_map(ftj(), to_config_dict(ftj())))
    assert "s3-creds" not in rendered and "AWS_SECRET" not in rendered


TRACKING = {
    "reportTo": ["tensorboard", "mlflow"],
    "mlflow": {
        "trackingUri": "https://mlflow.example.com",
        "experiment": "support-bot",
        "credentialsSecretRef": {"name": "mlflow-creds", "passwordKey": "pw"},
    },
}


def test_tracking_reaches_the_trainer_and_its_credentials_only_the_pod_env() -> None:
    parent = ftj(tracking=TRACKING)
    cfg = finetunejob_to_config(parent, in_pod=True)
    assert cfg.report_to == ["tensorboard", "mlflow"]
    assert (cfg.mlflow.tracking_uri, cfg.mlflow.experiment) == ("https://mlflow.example.com", "support-bot")

    [c] = fb.job(parent, 1, SETTINGS)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    # Keys the spec names win; the others default to the variable's own name; a Secret may lack some.
    for var, key in (
        ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        ("MLFLOW_TRACKING_PASSWORD", "pw"),
        ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_TOKEN"),
    ):
        assert "value" not in env[var]
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-creds", "key": key, "optional": True}
    rendered = yaml.safe_dump(fb.config_map(parent, to_config_dict(parent)))
    assert "https://mlflow.example.com" in rendered  # where to report is configuration ...
    assert "mlflow-creds" not in rendered and "MLFLOW_TRACKING" not in rendered  # ... who reports is not


def test_no_tracking_no_tracker_env() -> None:
    [c] = fb.job(ftj(), 1, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if e["name"].startswith("MLFLOW_")]
    assert finetunejob_to_config(ftj(), in_pod=True).report_to == []
    no_secret = ftj(tracking={"reportTo": ["mlflow"], "mlflow": {"trackingUri": "http://mlflow:5000"}})
    [c] = fb.job(no_secret, 1, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if e["name"].startswith("MLFLOW_")]


def test_scheduling_fields_pass_through() -> None:
    sched = {
        "nodes": 1,
        "gpusPerNode": 1,
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "training-high",
        "schedulerName": "volcano",
    }
    pod = fb.job(ftj(resources=sched), 1, SETTINGS)["spec"]["template"]["spec"]
    for k in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "schedulerName"):
        assert pod[k] == sched[k]


def test_suspend_and_kueue_queue() -> None:
    assert fb.job(ftj(runPolicy={"suspend": True}), 1, SETTINGS)["spec"]["suspend"] is True
    queued = fb.job(ftj(runPolicy={"queueName": "gpu-queue"}), 1, SETTINGS)
    assert queued["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert fb.job(ftj(), 1, SETTINGS)["spec"]["suspend"] is False


def test_pvc_sources_are_mounted_read_only_and_resolved() -> None:
    parent = ftj(
        baseModel={"uri": "pvc://models/llama"}, dataset={"train": {"uri": "pvc://data/train.jsonl"}}
    )
    pod = fb.job(parent, 1, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models", "data"}
    cfg = to_config_dict(parent)
    assert cfg["model_name"] == "/mnt/kubetune/models/llama"
    assert cfg["train_file"] == "/mnt/kubetune/data/train.jsonl"


def test_augmentation_is_converted_with_its_uris_resolved_and_mounted() -> None:
    augmentation = {
        "synonyms": {"file": "pvc://data/synonyms.txt", "variants": 2, "includeResponse": True},
        "paraphrase": {
            "model": "pvc://models/paraphraser",
            "maxVariants": 100,
            "prompt": "paraphrase: {text}",
        },
        "backTranslation": {"model": "hf://org/en-de", "backModel": "file:///models/de-en", "batchSize": 4},
    }
    parent = ftj(dataset={"train": {"uri": "s3://data/train.jsonl"}, "augmentation": augmentation})
    pod = fb.job(parent, 1, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models", "data"}
    aug = finetunejob_to_config(parent, in_pod=True).augmentation
    assert aug is not None and aug.synonyms is not None and aug.paraphrase is not None
    assert aug.synonyms.synonyms_file == "/mnt/kubetune/data/synonyms.txt"
    assert aug.synonyms.variants == 2 and aug.synonyms.include_response is True
    assert aug.paraphrase.model == "/mnt/kubetune/models/paraphraser"
    assert aug.paraphrase.max_variants == 100 and aug.paraphrase.prompt == "paraphrase: {text}"
    assert aug.back_translation is not None
    assert (aug.back_translation.model, aug.back_translation.back_model) == ("org/en-de", "/models/de-en")
    assert aug.back_translation.batch_size == 4
    # `synonyms: {}` (a manifest the API server has not defaulted) still turns synonyms on.
    bare = finetunejob_to_config(
        ftj(dataset={"train": {"uri": "s3://d/t.jsonl"}, "augmentation": {"synonyms": {}}})
    )
    assert bare.augmentation is not None and bare.augmentation.synonyms is not None
    assert finetunejob_to_config(ftj()).augmentation is None


def test_long_names_stay_valid_dns_labels() -> None:
    parent = ftj()
    parent["metadata"]["name"] = "a" * 63
    job = fb.job(parent, 12, SETTINGS)
    assert len(job["metadata"]["name"]) <= 56  # + "-<index>" stays <= 63 for pod hostnames
    assert len(fb.headless_service(parent, SETTINGS)["metadata"]["name"]) <= 63


def test_trainer_config_is_a_valid_finetuning_config() -> None:
    cfg = finetunejob_to_config(ftj(), in_pod=True)
    assert cfg.method == "lora" and cfg.lora.r == 16 and cfg.lora.alpha == 32
    assert cfg.deepspeed is not None and cfg.deepspeed.zero_stage == 2
    assert cfg.storage_root() == "s3://ckpt/runs/team-a/llama-lora/u-123/"
    assert cfg.save_steps == 100 and cfg.keep_last == 2 and cfg.progress_bar is False
    assert cfg.job is not None and (cfg.job.namespace, cfg.job.name) == ("team-a", "llama-lora")


@pytest.mark.parametrize(
    ("block", "expected"),
    [({}, ("eval_loss", 3, 0.0)), ({"metric": "exact_match", "patience": 5}, ("exact_match", 5, 0.0))],
    ids=["empty-block-means-defaults", "given-fields-win"],
)
def test_early_stopping_block_turns_early_stopping_on(block: dict, expected: tuple) -> None:
    # A manifest run with `kubetune run --local` has not been defaulted by the API server.
    data = {"train": {"uri": "s3://data/train.jsonl"}, "validationSplit": 0.1}
    evaluation = {"metrics": ["perplexity", "exact_match"], "everySteps": 100, "earlyStopping": block}
    cfg = finetunejob_to_config(ftj(dataset=data, evaluation=evaluation), in_pod=True)
    assert cfg.early_stopping is not None
    assert (cfg.early_stopping.metric, cfg.early_stopping.patience, cfg.early_stopping.threshold) == expected


def test_semantic_model_reaches_the_trainer_config() -> None:
    evaluation = {
        "metrics": ["semantic_similarity"],
        "semanticModel": "sentence-transformers/all-MiniLM-L6-v2",
    }
    cfg = finetunejob_to_config(ftj(evaluation=evaluation), in_pod=True)
    assert cfg.semantic_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "semantic_similarity" in cfg.metrics


def test_ddp_strategy_has_no_deepspeed_block() -> None:
    cfg = finetunejob_to_config(ftj(distributed={"strategy": "ddp"}), in_pod=True)
    assert cfg.deepspeed is None


@pytest.mark.parametrize("uri,expected", [("hf://org/model", "org/model"), ("file:///models/m", "/models/m")])
def test_model_uri_schemes(uri: str, expected: str) -> None:
    assert to_config_dict(ftj(baseModel={"uri": uri}))["model_name"] == expected


# ---- AdapterDeployment ---------------------------------------------------------------------------


def adep(**spec_overrides) -> dict:
    spec = {
        "baseModel": {"uri": "s3://models/llama-1b"},
        "adapters": [
            {"name": "support", "source": "s3://a/support/"},
            {"name": "sql", "fineTuneJobRef": {"name": "j"}},
        ],
        "runtime": "builtin",
        "replicas": 2,
        "resources": {"gpus": 1},
        "service": {"port": 8000},
        "storage": {"secretRef": {"name": "s3-creds"}},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "assist", "namespace": "team-a", "uid": "u-9", "generation": 1},
        "spec": spec,
    }


ADAPTERS = [
    ab.ResolvedAdapter("support", "s3://a/support/", 16),
    ab.ResolvedAdapter("sql", "s3://b/final/", 8),
]


def test_builtin_runtime_serves_the_adapter_set_from_a_configmap() -> None:
    d = ab.deployment(adep(), ADAPTERS, SETTINGS)
    pod = d["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "kubetune/trainer:test"
    assert c["command"] == ["kubetune"]
    assert c["args"][:2] == ["serve", "--base-model"]
    assert "--adapter-set" in c["args"]
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    cm = ab.config_map(adep(), ADAPTERS)
    assert '"name": "sql"' in cm["data"]["adapters.json"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_changing_the_adapter_set_changes_the_template_in_rolling_mode_only() -> None:
    a = ab.deployment(adep(), ADAPTERS, SETTINGS)
    b = ab.deployment(adep(), ADAPTERS[:1], SETTINGS)
    assert a["spec"]["template"] != b["spec"]["template"]
    hot_a = ab.deployment(adep(hotReload=True), ADAPTERS, SETTINGS)
    hot_b = ab.deployment(adep(hotReload=True), ADAPTERS[:1], SETTINGS)
    assert hot_a["spec"]["template"] == hot_b["spec"]["template"]
    assert [c["name"] for c in hot_a["spec"]["template"]["spec"]["containers"]] == ["server", "adapter-sync"]


def test_vllm_runtime_fetches_adapters_in_an_init_container() -> None:
    d = ab.deployment(adep(runtime="vllm"), ADAPTERS, SETTINGS)
    pod = d["spec"]["template"]["spec"]
    names = [c["name"] for c in pod["initContainers"]]
    assert names == ["fetch-base-model", "fetch-adapters"]
    fetch = pod["initContainers"][1]
    assert fetch["args"][:3] == ["fetch", "--dest", "/adapters"]
    [c] = pod["containers"]
    args = c["args"]
    assert "--enable-lora" in args
    assert args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--max-lora-rank") + 1] == "16"
    i = args.index("--lora-modules")
    assert args[i + 1 : i + 3] == ["support=/adapters/support", "sql=/adapters/sql"]
    assert args[args.index("--model") + 1] == "/models/base"


def test_vllm_with_hot_reload_sizes_lora_slots_from_the_spec_not_the_adapter_list() -> None:
    hot_a = ab.deployment(adep(runtime="vllm", hotReload=True), ADAPTERS, SETTINGS)
    hot_b = ab.deployment(adep(runtime="vllm", hotReload=True), ADAPTERS[:1], SETTINGS)
    assert hot_a["spec"]["template"] == hot_b["spec"]["template"]  # an adapter change does not roll
    pod = hot_a["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-base-model"]
    server, sync = pod["containers"]
    assert sync["name"] == "adapter-sync"
    args = server["args"]
    assert "--lora-modules" not in args
    assert args[args.index("--max-loras") + 1] == str(ab.HOT_RELOAD_MAX_LORAS)
    assert args[args.index("--max-lora-rank") + 1] == "64"
    sized = ab.deployment(
        adep(runtime="vllm", hotReload=True, vllm={"maxLoras": 3, "maxLoraRank": 128}), ADAPTERS, SETTINGS
    )
    args = sized["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (args[args.index("--max-loras") + 1], args[args.index("--max-lora-rank") + 1]) == ("3", "128")


def test_autoscaling_hands_replicas_to_the_hpa() -> None:
    spec = adep(autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70})
    d = ab.deployment(spec, ADAPTERS, SETTINGS)
    assert "replicas" not in d["spec"]
    h = ab.hpa(spec)
    assert h is not None
    assert (h["spec"]["minReplicas"], h["spec"]["maxReplicas"]) == (1, 4)
    assert h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
    assert ab.hpa(adep()) is None


def test_vllm_rank_rounds_up_to_a_supported_size() -> None:
    assert ab.vllm_max_lora_rank([ab.ResolvedAdapter("a", "s3://x/", 12)]) == 16
    assert ab.vllm_max_lora_rank([ab.ResolvedAdapter("a", "s3://x/")]) == 64
    assert ab.vllm_max_lora_rank([], override=32) == 32


def _method(**block) -> Method:
    return Method.model_validate(block)


def test_the_trainers_report_decides_the_rank_and_the_spec_is_only_a_fallback() -> None:
    qlora = _method(type="qlora", qlora={"r": 16})
    reported = OutputStatus.model_validate({"adapterUri": "s3://x/", "method": "qlora", "rank": 96})
    assert ab.trained_output(qlora, reported) == ab.TrainedOutput("qlora", 96)
    # A report without the fields (an older trainer image): the spec's block of the job's method,
    # the qlora block for qlora (spec.method.lora alone left a QLoRA job at vLLM's 64).
    bare = OutputStatus.model_validate({"adapterUri": "s3://x/"})
    assert ab.trained_output(qlora, bare) == ab.TrainedOutput("qlora", 16)
    assert ab.trained_output(_method(type="lora"), bare) == ab.TrainedOutput("lora", 8)  # LoraParams' default
    assert ab.trained_output(_method(type="prompt"), None) == ab.TrainedOutput("prompt", None)
    assert ab.trained_output(None, None) == ab.TrainedOutput(None, None)
    resolved = [ab.ResolvedAdapter("q", "s3://x/", ab.trained_output(qlora, reported).rank)]
    args = ab.deployment(adep(runtime="vllm"), resolved, SETTINGS)["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "128"


@pytest.mark.parametrize("runtime", ["builtin", "vllm"])
def test_only_lora_outputs_are_servable_and_a_refusal_says_what_to_do(runtime: str) -> None:
    for method in ("lora", "qlora", None):
        assert ab.unservable(runtime, ab.TrainedOutput(method, 8), "FineTuneJob j", "s3://o/") is None
    for method in ("prefix", "prompt", "ptuning"):
        why = ab.unservable(runtime, ab.TrainedOutput(method, None), "FineTuneJob j", "s3://o/")
        assert why is not None and f"trained a {method} adapter" in why and f"runtime {runtime}" in why
        assert "method lora or qlora" in why
    full = ab.unservable(runtime, ab.TrainedOutput("full", None), "FineTuneJob j", "s3://o/final/")
    assert full is not None and "spec.baseModel.uri: s3://o/final/" in full


@pytest.mark.parametrize("runtime", ["builtin", "vllm"])
def test_base_model_loading_options_reach_the_server(runtime: str) -> None:
    def args(**base) -> list[str]:
        spec = adep(runtime=runtime, baseModel={"uri": "hf://org/llama", **base})
        return ab.deployment(spec, ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["args"]

    plain = args()
    assert not {"--revision", "--dtype", "--trust-remote-code"} & set(plain)
    got = args(revision="v1.1", dtype="bfloat16", trustRemoteCode=True)
    assert got[got.index("--revision") + 1] == "v1.1" and got[got.index("--dtype") + 1] == "bfloat16"
    assert "--trust-remote-code" in got
    # A revision names a hub commit: an s3:// or pvc:// model has none, so it is not passed.
    spec = adep(runtime=runtime, baseModel={"uri": "s3://models/llama", "revision": "v1.1"})
    container = ab.deployment(spec, ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert "--revision" not in container["args"]


def test_builtin_flags_are_flags_kubetune_serve_accepts() -> None:
    from kubetune_trainer.serve.cli import build_parser, server_config_from_args

    spec = adep(
        baseModel={"uri": "hf://org/llama", "revision": "v1.1", "dtype": "float16", "trustRemoteCode": True}
    )
    container = ab.deployment(spec, ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    argv = [a for a in container["args"] if not a.startswith("/etc/kubetune")]
    argv = [a for a in argv if a != "--adapter-set"]
    cfg = server_config_from_args(build_parser().parse_args(argv))
    assert (cfg.base_model, cfg.revision, cfg.dtype, cfg.trust_remote_code) == (
        "org/llama",
        "v1.1",
        "float16",
        True,
    )


def test_builders_do_not_mutate_the_parent() -> None:
    parent = ftj()
    before = copy.deepcopy(parent)
    fb.job(parent, 1, SETTINGS)
    to_config_dict(parent)
    assert parent == before


def test_the_job_fails_itself_on_non_retryable_exit_codes() -> None:
    j = fb.job(ftj(), 1, SETTINGS)
    [rule] = j["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [2, 3, 4]}
    assert j["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


# -- AdapterDeployment auth and NetworkPolicy ---------------------------------------------------

AUTH = {"apiKeySecretRef": {"name": "serve-keys"}, "adminKeySecretRef": {"name": "serve-admin", "key": "k"}}


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_builtin_auth_mounts_the_keys_from_secrets_never_in_args_env_or_configmaps() -> None:
    d = ab.deployment(adep(auth=AUTH, hotReload=True), ADAPTERS, SETTINGS)
    pod = d["spec"]["template"]["spec"]
    server, sidecar = pod["containers"]
    args = server["args"]
    assert args[args.index("--api-key-file") + 1] == "/etc/kubetune/auth/api-keys"
    assert args[args.index("--admin-key-file") + 1] == "/etc/kubetune/auth/admin-keys"
    assert "--runtime-adapter-updates" in args and args[args.index("--adapter-root") + 1] == "/adapters"
    [vol] = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert vol["projected"]["sources"] == [
        {"secret": {"name": "serve-keys", "items": [{"key": "api-keys", "path": "api-keys"}]}},
        {"secret": {"name": "serve-admin", "items": [{"key": "k", "path": "admin-keys"}]}},
    ]
    assert vol["projected"]["defaultMode"] == 0o440  # group-readable through the pod's fsGroup
    assert {"name": "auth", "mountPath": "/etc/kubetune/auth", "readOnly": True} in server["volumeMounts"]
    assert not any(m["name"] == "auth" for m in sidecar["volumeMounts"])
    # The sidecar loads and unloads: it gets the admin key, from the Secret, as an env reference.
    assert _env(sidecar)["KUBETUNE_SERVER_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "serve-admin", "key": "k"}
    }
    assert "KUBETUNE_SERVER_API_KEY" not in _env(server)
    # Probes stay on the open routes.
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    # No key material anywhere but Secret references.
    assert "serve-keys" not in yaml.safe_dump(ab.config_map(adep(auth=AUTH), ADAPTERS))


def test_without_an_admin_key_the_sidecar_sends_the_api_key_and_rolling_mode_keeps_loading_off() -> None:
    auth = {"apiKeySecretRef": {"name": "serve-keys", "key": "clients"}}
    hot = ab.deployment(adep(auth=auth, hotReload=True), ADAPTERS, SETTINGS)
    server, sidecar = hot["spec"]["template"]["spec"]["containers"]
    assert _env(sidecar)["KUBETUNE_SERVER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "serve-keys",
        "key": "clients",
    }
    assert "--admin-key-file" not in server["args"]
    rolling = ab.deployment(adep(auth=auth), ADAPTERS, SETTINGS)
    [server] = rolling["spec"]["template"]["spec"]["containers"]
    assert "--api-key-file" in server["args"]
    assert "--runtime-adapter-updates" not in server["args"] and "--adapter-root" not in server["args"]
    # Without auth: no key flags, no auth volume.
    [plain] = ab.deployment(adep(), ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert not [a for a in plain["args"] if "key" in a]
    assert not [
        v
        for v in ab.deployment(adep(), ADAPTERS, SETTINGS)["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "auth"
    ]


def test_vllm_auth_and_runtime_lora_updating_only_with_hot_reload() -> None:
    auth = {"apiKeySecretRef": {"name": "serve-keys"}}
    d = ab.deployment(adep(runtime="vllm", auth=auth), ADAPTERS, SETTINGS)
    [server] = d["spec"]["template"]["spec"]["containers"]
    assert _env(server)["VLLM_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "serve-keys", "key": "api-keys"}
    }
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in _env(server)  # nothing reloads: the routes stay off
    assert not any("key" in a for a in server["args"])
    hot = ab.deployment(adep(runtime="vllm", auth=auth, hotReload=True), ADAPTERS, SETTINGS)
    server, sidecar = hot["spec"]["template"]["spec"]["containers"]
    assert _env(server)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert _env(sidecar)["KUBETUNE_SERVER_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "serve-keys"


def test_network_policy_admits_only_the_listed_clients() -> None:
    assert ab.network_policy(adep()) is None
    same_ns = ab.network_policy(adep(networkPolicy={}))
    assert same_ns["kind"] == "NetworkPolicy" and same_ns["apiVersion"] == "networking.k8s.io/v1"
    assert same_ns["metadata"]["ownerReferences"][0]["uid"] == "u-9"
    assert same_ns["spec"]["podSelector"]["matchLabels"] == ab.service(adep())["spec"]["selector"]
    assert same_ns["spec"]["policyTypes"] == ["Ingress"]
    assert same_ns["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8000}]}
    ]
    peers = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}},
        {
            "namespaceSelector": {"matchLabels": {"team": "a"}},
            "podSelector": {"matchLabels": {"app": "chat"}},
        },
    ]
    listed = ab.network_policy(adep(networkPolicy={"allowFrom": peers}))
    assert listed["spec"]["ingress"][0]["from"] == peers
