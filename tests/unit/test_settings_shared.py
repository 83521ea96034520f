"""One declaration per training setting: the FineTuneJob API and the trainer's FinetuningConfig
share their blocks (kubetune_trainer.settings), their defaults and their rules.

- every flat FinetuningConfig field that is a FineTuneJob setting carries the block field's own
  declaration (default, bounds, description), and a FineTuneJob that sets nothing converts to a
  FinetuningConfig that differs from the trainer's defaults in nothing but what it names;
- the invalid manifests of test_api_cases that concern training settings are rejected by the
  trainer config too, with the API's message, when the API's own checks are skipped.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubetune_operator.api import FineTuneJob, InvalidManifestError, load_finetunejob
from kubetune_operator.api.finetunejob import (
    Augmentation,
    BackTranslationAugmentation,
    Mlflow,
    ParaphraseAugmentation,
    Replay,
    SynonymAugmentation,
    Tracking,
)
from kubetune_operator.api.manifest import load_model
from kubetune_operator.convert import POD_OUTPUT_DIR, to_config, to_config_dict
from kubetune_operator.finetunejob import builders
from kubetune_trainer import config, settings
from kubetune_trainer.apimodel import class_rules, field_rules
from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.jobfile import load_job_file
from tests.unit.test_api_cases import INVALID, finetunejob

# ---- defaults and declarations ---------------------------------------------------------------------------


def _constraints(info: Any) -> list[Any]:
    return [m for m in info.metadata if not isinstance(m, settings.Source)]


def test_every_flat_setting_is_the_blocks_own_declaration() -> None:
    shared = settings.sources(FinetuningConfig)
    # The guide's flat names of hyperparameters, evaluation, checkpointing and data options.
    assert {"learning_rate", "num_train_epochs", "eval_steps", "save_steps", "max_seq_length"} <= set(shared)
    for name, src in shared.items():
        mine, theirs = FinetuningConfig.model_fields[name], src.block.model_fields[src.name]
        where = f"FinetuningConfig.{name} vs {src.block.__name__}.{src.name}"
        assert mine.get_default(call_default_factory=True) == theirs.get_default(call_default_factory=True), (
            where
        )
        assert _constraints(mine) == _constraints(theirs), where
        assert mine.description == theirs.description, where
    # Every field of the shared flat blocks has its trainer field.
    for block in (
        settings.Hyperparameters,
        settings.Evaluation,
        settings.Checkpointing,
        settings.DatasetOptions,
    ):
        named = {src.name for src in shared.values() if src.block is block}
        unmapped = set(block.model_fields) - named - {"early_stopping"}  # early_stopping: a nested block
        assert not unmapped, f"{block.__name__} fields without a FinetuningConfig field: {unmapped}"


@pytest.mark.parametrize(
    ("field", "block"),
    [
        ("lora", settings.LoraParams),
        ("quantization", settings.QuantizationParams),
        ("virtual_tokens", settings.VirtualTokenParams),
    ],
)
def test_method_blocks_are_the_api_classes(field: str, block: type[BaseModel]) -> None:
    assert FinetuningConfig.model_fields[field].annotation is block
    assert getattr(FinetuningConfig(model_name="m", train_file="t"), field) == block()


def _job(**spec: Any) -> dict[str, Any]:
    job = finetunejob("defaults")
    job["metadata"]["namespace"] = "team-a"
    job["spec"].update(spec)
    return job


# What a minimal manifest names, and what only the cluster sets: nothing else may differ from the
# trainer's defaults, or the API and the trainer disagree on a default.
NAMED = {
    "model_name",
    "train_file",
    "storage_uri",
    "output_dir",
    "deepspeed",
    "job",
    "metrics_port",
    "progress_bar",
}


def test_api_defaults_are_the_trainers_for_every_field() -> None:
    assert set(to_config_dict(_job())) == NAMED
    # Every block present but empty: the API fills in its defaults, and they are the trainer's.
    every_block = _job(
        method={"type": "lora", "lora": {}},
        hyperparameters={},
        evaluation={},
        checkpointing={},
        distributed={"strategy": "deepspeed", "deepspeed": {}},
        dataset={"train": {"uri": "s3://data/train.jsonl"}, "replay": {"uri": "s3://data/old.jsonl"}},
    )
    assert set(to_config_dict(every_block)) == NAMED | {"replay_file"}
    for method in ("qlora", "prefix", "prompt", "ptuning"):
        job = _job(method={"type": method, method: {}}, resources={"gpusPerNode": 1})
        assert set(to_config_dict(job)) == NAMED | {"method"}, method
    assert to_config_dict(_job())["deepspeed"] == {}  # ZeRO-2 without offload: DeepSpeed()'s defaults


def test_the_replay_fraction_has_one_default() -> None:
    """The cluster (API default) and a laptop (trainer default) mix in the same share of replay."""
    job = _job(dataset={"train": {"uri": "s3://data/t.jsonl"}, "replay": {"uri": "s3://data/old.jsonl"}})
    from_api = to_config(job).replay_fraction
    trainer = FinetuningConfig(model_name="m", train_file="t", replay_file="r").replay_fraction
    assert from_api == trainer == Replay(uri="s3://d/x").fraction == settings.REPLAY_FRACTION_DEFAULT


def test_use_rslora_compute_dtype_and_dtype_reach_the_trainer() -> None:
    job = _job(
        baseModel={"uri": "hf://org/base", "dtype": "bfloat16"},
        method={"type": "qlora", "qlora": {"r": 16, "useRslora": True, "computeDtype": "bf16"}},
        resources={"gpusPerNode": 1},
    )
    cfg = to_config(job)
    assert (cfg.lora.r, cfg.lora.use_rslora, cfg.quantization.compute_dtype) == (16, True, "bf16")
    assert cfg.model_dtype == "bfloat16"


# The augmentation blocks: the API and the trainer each add only where the inputs are.
AUGMENTATION_BLOCKS = [
    (settings.SynonymOptions, SynonymAugmentation, config.SynonymAugmentation, {"file"}, {"synonyms_file"}),
    (settings.ParaphraseOptions, ParaphraseAugmentation, config.ParaphraseAugmentation, {"model"}, {"model"}),
    (
        settings.BackTranslationOptions,
        BackTranslationAugmentation,
        config.BackTranslationAugmentation,
        {"model", "back_model"},
        {"model", "back_model"},
    ),
]


@pytest.mark.parametrize(("shared", "api", "trainer", "api_only", "trainer_only"), AUGMENTATION_BLOCKS)
def test_augmentation_blocks_share_one_declaration(
    shared: type[BaseModel],
    api: type[BaseModel],
    trainer: type[BaseModel],
    api_only: set[str],
    trainer_only: set[str],
) -> None:
    assert issubclass(api, shared) and issubclass(trainer, shared)
    assert set(api.model_fields) - set(shared.model_fields) == api_only
    assert set(trainer.model_fields) - set(shared.model_fields) == trainer_only
    for name, declared in shared.model_fields.items():
        # Not redeclared on either side: the inherited declaration, with its default, bounds and rules.
        # (FieldInfo compares by identity: its repr shows default, alias, description and constraints.)
        assert repr(api.model_fields[name]) == repr(declared) == repr(trainer.model_fields[name]), name
    assert class_rules(api) == class_rules(trainer) == class_rules(shared)


def test_augmentation_and_mlflow_defaults_agree() -> None:
    """An augmentation block that names only its inputs converts to the trainer's defaults."""
    job = _job(
        dataset={
            "train": {"uri": "s3://data/t.jsonl"},
            "augmentation": {
                "synonyms": {"file": "s3://data/syn.txt"},
                "paraphrase": {"model": "s3://models/para"},
                "backTranslation": {"model": "hf://org/to-de", "backModel": "hf://org/to-en"},
            },
        },
        tracking={"reportTo": ["mlflow"], "mlflow": {"trackingUri": "http://mlflow:5000"}},
    )
    converted = to_config_dict(job)
    assert converted["augmentation"] == {
        "synonyms": {"synonyms_file": "s3://data/syn.txt"},
        "paraphrase": {"model": "s3://models/para"},
        "back_translation": {"model": "org/to-de", "back_model": "org/to-en"},
    }
    assert converted["mlflow"] == {"tracking_uri": "http://mlflow:5000"}
    assert class_rules(Augmentation) == class_rules(config.AugmentationSettings)
    # MLflow: the experiment's declaration and the URI rule are the same objects on both sides.
    assert repr(Mlflow.model_fields["experiment"]) == repr(config.MlflowSettings.model_fields["experiment"])
    uri_rules = [field_rules(m, "tracking_uri") for m in (Mlflow, config.MlflowSettings)]
    assert all(settings.MLFLOW_URI_WITHOUT_CREDENTIALS in r for r in uri_rules)
    assert settings.MLFLOW_NEEDS_REPORT_TO in class_rules(Tracking)
    for name in ("synonyms", "paraphrase", "back_translation"):
        assert (
            Augmentation.model_fields[name].description
            == config.AugmentationSettings.model_fields[name].description
        )


# ---- the rules -------------------------------------------------------------------------------------------

# Invalid FineTuneJobs whose mistake is in a training setting: the trainer rejects each, with the message
# the API gives. The cases not listed concern the cluster (GPUs, resources, URIs, storage, env, policy),
# the shape of the manifest (which method block, unknown fields), or a type or bound, which is the same
# declaration on both sides (test_every_flat_setting_is_the_blocks_own_declaration).
TRAINING_RULE_CASES = [
    "qlora-with-zero3",
    "offload-all-needs-zero3",
    "offload-needs-zero",
    "no-training-data",
    "empty-mixture",
    "validation-and-split",
    "packing-with-prefix",
    "ewc-with-zero3",
    "init-adapter-with-full",
    "early-stopping-without-validation",
    "early-stopping-metric-not-computed",
    "early-stopping-without-evaluations",
    "early-stopping-on-confusion-matrix",
    "early-stopping-on-rouge",
    "early-stopping-on-a-typo",
    "semantic-similarity-without-model",
    "early-stopping-checkpoints-between-evaluations",
    "early-stopping-step-checkpoints-epoch-evaluations",
    "steps-without-every-steps",
    "merged-model-with-prefix",
    "lora-target-modules-empty",
    "qlora-all-linear-with-others",
    "augmentation-without-method",
    "augmentation-prompt-without-text",
    "augmentation-cap-below-variants",
    "mlflow-server-without-report-to",
    "mlflow-credentials-in-uri",
]
# Tracking cases the trainer accepts on purpose: it also runs on a laptop, where report_to mlflow without
# a server writes MLflow's local ./mlruns and any MLflow URI (file:, sqlite:) is fine; only a pod would lose
# them. The Secret's name is a cluster matter.
CLUSTER_ONLY_TRACKING_CASES = ["mlflow-without-server", "mlflow-uri-not-http", "mlflow-secret-name-invalid"]
CASES = {c.id: c for c in INVALID}


def test_the_list_names_real_cases() -> None:
    assert set(TRAINING_RULE_CASES) | set(CLUSTER_ONLY_TRACKING_CASES) <= set(CASES)
    # Every augmentation and tracking case is either shared above, a bound (the same declaration on both
    # sides), a URI (the API's location, which the converter resolves), or cluster-only.
    for case_id in CASES:
        if case_id.startswith(("augmentation-", "mlflow-")):
            declared_once = (
                "fraction-zero",
                "too-many-variants",
                "file-with-space",
                "without-scheme",
                "without-back",
            )
            assert (
                case_id in TRAINING_RULE_CASES
                or case_id in CLUSTER_ONLY_TRACKING_CASES
                or any(part in case_id for part in declared_once)
            ), case_id


@pytest.mark.parametrize("case_id", TRAINING_RULE_CASES)
def test_trainer_rejects_the_case_with_the_api_message(case_id: str) -> None:
    manifest = CASES[case_id].manifest()
    manifest["metadata"]["namespace"] = "team-a"
    with pytest.raises(InvalidManifestError) as api:
        load_finetunejob(copy.deepcopy(manifest))
    [(_, api_message)] = api.value.errors
    # The trainer's side: the manifest with the API's rules skipped (types and bounds still checked),
    # converted as the operator does (a fineTuneJobRef resolved to an adapter), then FinetuningConfig.
    job = load_model(FineTuneJob, manifest, check_rules=False)
    with pytest.raises(ConfigError) as trainer:
        to_config(job, init_adapter="s3://runs/team-a/task-1/uid/final/")
    assert api_message in str(trainer.value)


# ---- the cluster and a laptop turn the same manifest into the same training run ---------------------------

EXAMPLES = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
JOB_EXAMPLES = [p for p in EXAMPLES if yaml.safe_load(p.read_text()).get("kind") == "FineTuneJob"]
# Set where the run happens, not by the manifest: the pod's working directory, its metrics port, and
# no progress bar in pod logs.
WHERE_IT_RUNS = {"output_dir", "metrics_port", "progress_bar"}


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=[p.name for p in JOB_EXAMPLES])
def test_cluster_and_local_build_the_same_config(path: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    identity = {"namespace": "default", "uid": "0000"}  # what the API server adds, given to both
    ref = ((raw["spec"]["baseModel"].get("initAdapter") or {}).get("fineTuneJobRef") or {}).get("name")
    resolved = f"s3://kubetune/runs/default/{ref}/1111/final/" if ref else None

    # The cluster: the API server's defaults (the client-side mirror), the reconciler's conversion,
    # the ConfigMap the builders write, read by the pod as `kubetune train --config`.
    stored = load_finetunejob(copy.deepcopy(raw)).to_manifest()
    stored["metadata"] |= identity
    config_map = builders.config_map(stored, to_config_dict(stored, init_adapter=resolved))
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    (pod_dir / builders.CONFIG_FILE).write_text(config_map["data"][builders.CONFIG_FILE])
    in_cluster = FinetuningConfig.from_yaml(pod_dir / builders.CONFIG_FILE)

    # A laptop: `kubetune run job.yaml --local` on the file as written (a fineTuneJobRef, which only the
    # operator can look up, replaced by the adapter URI it resolved to, as the error message says).
    local_raw = copy.deepcopy(raw)
    local_raw["metadata"] |= identity
    if ref:
        with pytest.raises(ConfigError, match="fineTuneJobRef"):
            _write_and_load(local_raw, tmp_path / "as-written")
        local_raw["spec"]["baseModel"]["initAdapter"] = {"uri": resolved}
    local = _write_and_load(local_raw, tmp_path / "local")

    assert in_cluster.output_dir == POD_OUTPUT_DIR and local.output_dir.startswith(str(tmp_path))
    assert in_cluster.model_dump(exclude=WHERE_IT_RUNS) == local.model_dump(exclude=WHERE_IT_RUNS)
    assert in_cluster.method == raw["spec"].get("method", {}).get("type", "lora")


def _write_and_load(manifest: dict[str, Any], where: Path) -> FinetuningConfig:
    where.mkdir()
    (where / "job.yaml").write_text(yaml.safe_dump(manifest))
    return load_job_file(where / "job.yaml")


def test_every_shared_rule_points_at_a_trainer_field() -> None:
    """A trainer error names the FinetuningConfig field of the rule (then the FineTuneJob's message)."""
    from kubetune_trainer.config import _TRAINER_FIELD

    paths = [
        *(".dataset" + (r.field_path or "") for r in settings.DATASET_RULES),
        *(".evaluation" + (r.field_path or "") for r in class_rules(settings.Evaluation)),
        *((r.field_path or "") for r in settings.TRAINING_RULES),
        ".tracking" + (settings.MLFLOW_NEEDS_REPORT_TO.field_path or ""),
    ]
    for path in paths:
        assert _TRAINER_FIELD[path].split(".")[0] in FinetuningConfig.model_fields, path


def test_a_config_dumps_snake_case_names_inside_the_shared_blocks() -> None:
    """Provenance files and search trials read the dump by the trainer's (snake_case) names."""
    cfg = FinetuningConfig(
        model_name="m",
        train_file="t",
        method="ptuning",
        virtual_tokens={"num_virtual_tokens": 8},
        deepspeed={"overrides": {"zero_optimization": {"overlap_comm": True}}},
    )
    for dump in (cfg.model_dump(), cfg.model_dump(mode="json"), yaml.safe_load(cfg.to_yaml())):
        assert dump["virtual_tokens"]["num_virtual_tokens"] == 8
        assert dump["deepspeed"]["overrides"] == {"zero_optimization": {"overlap_comm": True}}
    assert '"num_virtual_tokens":8' in cfg.model_dump_json()
    assert FinetuningConfig.from_dict(cfg.model_dump()) == cfg
