"""FinetuningConfig: the guide's names, validation messages, YAML, and staying torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError, ExitCode
from kubetune_trainer.jobfile import load_job_file


def _cfg(**kw):
    return FinetuningConfig(**{"model_name": "m", "train_file": "t.jsonl", **kw})


def test_guide_names_and_use_lora_mapping() -> None:
    c = FinetuningConfig(
        model_name="gpt2",
        output_dir="./finetuned_model",
        train_file="train_data.json",
        validation_file="validation_data.json",
        use_lora=True,
        num_train_epochs=3,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
    )
    assert c.method == "lora" and c.uses_peft
    assert _cfg(use_lora=False).method == "full"
    assert _cfg(method="qlora", use_lora=True).method == "qlora"
    # Assignment is validated too (the guide's grid search sets config.learning_rate = lr).
    c.learning_rate = 1e-4
    with pytest.raises(ValueError, match="learning_rate"):
        c.learning_rate = -1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lerning_rate": 1e-4}, "'lerning_rate' (did you mean 'learning_rate'?)"),
        ({"use_lora": True, "method": "full"}, "use_lora=True contradicts method='full'"),
        (
            {"train_file": None},
            "train_file: dataset needs training data: set dataset.train.uri, or dataset.mixture",
        ),
        ({"metrics": ["blue"]}, "unknown metric 'blue' (did you mean 'bleu'?)"),
        (
            {"deepspeed": {"zero_stage": 2, "offload": "all"}},
            "deepspeed.offload: distributed.deepspeed.offload all (parameters too) needs zeroStage 3",
        ),
        (
            {"packing": True, "method": "prefix"},
            "packing: dataset.packing does not work with virtual-token methods",
        ),
        # replay_fraction / ewc_lambda without replay_file: checked when training starts, since
        # train(task, replay_buffer=...) supplies replay data (test_finetuner_continual.py).
        (
            {"early_stopping": {"metric": "eval_loss"}},
            "early_stopping: evaluation.earlyStopping needs validation data",
        ),
        (
            {"validation_split": 0.1, "early_stopping": {"metric": "exact_match"}},
            "early_stopping.metric: evaluation.earlyStopping.metric is not computed: use eval_loss or perplexity, "
            "or add the metric to evaluation.metrics",
        ),
        ({"early_stopping": {"metric": "confusion_matrix"}}, "confusion_matrix is a matrix, not a number"),
        (
            {"metrics": ["perplexity", "semantic_similarity"]},
            "semantic_model: evaluation.metrics semantic_similarity needs evaluation.semanticModel",
        ),
        # Trainer logs eval_rouge1 / eval_rouge2 / eval_rougeL, never eval_rouge.
        (
            {"validation_split": 0.1, "metrics": ["rouge"], "early_stopping": {"metric": "rouge"}},
            "early_stopping.metric: evaluation.earlyStopping.metric must be a number evaluation logs: eval_loss, "
            "perplexity or one of",
        ),
        ({"early_stopping": {"metric": "eval_rouge"}}, "(rouge is logged as rouge1/rouge2/rougeL;"),
        (
            {"validation_split": 0.1, "metrics": ["bleu"], "early_stopping": {"metric": "rougeL"}},
            "early_stopping.metric: evaluation.earlyStopping.metric is not computed",
        ),
        ({"storage_uri": "gs://bucket"}, "must look like s3://bucket/prefix"),
        ({"lr_scheduler_type": "cosine_annealing"}, "unknown lr_scheduler_type"),
        ({"lora": {"r": 8, "alpah": 16}}, "did you mean 'alpha'"),
        ({"lora": {"target_modules": []}}, "empty list"),
        ({"lora": {"target_modules": ["all-linear", "q_proj"]}}, "give it alone"),
        ({"eval_strategy": "steps"}, "eval_steps: evaluation.strategy steps needs evaluation.everySteps"),
        ({"method": "qlora", "deepspeed": {"zero_stage": 3}}, "qlora cannot shard"),
    ],
)
def test_bad_config_names_field_and_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        FinetuningConfig.from_dict({"model_name": "m", "train_file": "t.jsonl", **kwargs}, source="job.yaml")
    text = str(err.value)
    assert message in text
    assert text.startswith("job.yaml: invalid FinetuningConfig")
    assert err.value.exit_code == ExitCode.BAD_CONFIG


def test_all_linear_as_a_list_is_the_peft_string() -> None:
    """The FineTuneJob API spells it `targetModules: [all-linear]`; PEFT needs the string."""
    config = FinetuningConfig(model_name="m", train_file="t", lora={"target_modules": ["all-linear"]})
    assert config.lora.target_modules == ["all-linear"]  # the FineTuneJob's spelling, one declaration
    assert config.lora.peft_target_modules == "all-linear"


def test_all_errors_are_listed_with_their_field() -> None:
    with pytest.raises(ConfigError) as err:
        FinetuningConfig.from_dict(
            {"model_name": "m", "train_file": "t", "learning_rate": 0, "lora": {"r": 0}}
        )
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "  lora.r: Input should be greater than or equal to 1 (got 0)" in text
    assert "  learning_rate: Input should be greater than 0 (got 0)" in text


def test_yaml_round_trip_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    job = tmp_path / "jobs" / "job.yaml"
    job.parent.mkdir()
    (tmp_path / "jobs" / "model").mkdir()
    job.write_text(
        yaml.safe_dump(
            {
                "model_name": "model",
                "train_file": "data/train.jsonl",
                "validation_file": "/abs/val.jsonl",
                "output_dir": "out",
                "mixture": [{"path": "data/other.jsonl", "weight": 2}],
                "lora": {"r": 4},
                "deepspeed": {
                    "zero_stage": 3,
                    "offload": "all",
                    "overrides": {"zero_optimization": {"x": 1}},
                },
                "early_stopping": {"metric": "eval_loss", "patience": 2},
                "validation_split": None,
                "storage_uri": "s3://bucket/runs",
                "job": {"namespace": "team-a", "name": "ft1", "uid": "u-1"},
            }
        )
    )
    c = FinetuningConfig.from_yaml(job)
    base = str(tmp_path / "jobs")
    assert c.model_name == f"{base}/model"  # an existing directory next to the YAML
    assert c.train_file == f"{base}/data/train.jsonl"
    assert c.validation_file == "/abs/val.jsonl"
    assert c.output_dir == f"{base}/out"
    assert c.mixture[0].path == f"{base}/data/other.jsonl"
    assert c.deepspeed is not None and c.deepspeed.overrides == {"zero_optimization": {"x": 1}}
    assert c.storage_root() == "s3://bucket/runs/team-a/ft1/u-1/"
    again = FinetuningConfig.from_dict(yaml.safe_load(c.to_yaml()))
    assert again == c
    # A hub id is not rewritten even though it contains a slash.
    assert (
        FinetuningConfig.from_dict({"model_name": "org/model", "train_file": "t"}).model_name == "org/model"
    )


def test_from_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FinetuningConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        FinetuningConfig.from_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        FinetuningConfig.from_yaml(bad)


def test_finetunejob_manifest_is_converted_or_explained(tmp_path: Path) -> None:
    manifest = tmp_path / "ftj.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "colours", "namespace": "team-a"},
                "spec": {
                    "baseModel": {"uri": "file:///models/tiny"},
                    "dataset": {"train": {"uri": "data/train.jsonl"}},
                    "method": {"type": "lora", "lora": {"r": 4}},
                    "distributed": {"strategy": "ddp"},
                },
            }
        )
    )
    try:
        import kubetune_operator.convert  # noqa: F401
    except ImportError:  # the trainer image alone: a clear message instead of a conversion
        with pytest.raises(ConfigError, match="FineTuneJob manifest"):
            load_job_file(manifest)
        return
    cfg = load_job_file(manifest)
    assert cfg.model_name == "/models/tiny"
    assert cfg.train_file == str(tmp_path / "data" / "train.jsonl")
    assert cfg.lora.r == 4 and cfg.deepspeed is None
    assert cfg.job is not None and (cfg.job.namespace, cfg.job.name) == ("team-a", "colours")


def test_derived_settings() -> None:
    assert _cfg().resolved_eval_strategy == "no"
    assert _cfg(validation_split=0.1).resolved_eval_strategy == "epoch"
    assert _cfg(validation_split=0.1, eval_steps=5).resolved_eval_strategy == "steps"
    assert _cfg(metrics=["perplexity", "bleu", "bleu"]).metrics == ["perplexity", "bleu"]
    assert _cfg(metrics=["perplexity", "rouge", "f1"]).generation_metrics == ["rouge", "f1"]
    assert _cfg().storage_root() is None
    assert _cfg(storage_uri="s3://b/p/").storage_root() == "s3://b/p/"


def test_config_module_does_not_import_torch() -> None:
    code = (
        "import sys, kubetune_trainer.config as c, kubetune_trainer;"
        "c.FinetuningConfig(model_name='m', train_file='t');"
        "bad=[m for m in ('torch','transformers','peft','kubernetes') if m in sys.modules];"
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_early_stopping_accepts_exactly_the_names_evaluation_logs() -> None:
    """The accepted early_stopping metrics are the scalar names compute_text_metrics returns."""
    from kubetune_trainer.evaluation.metrics import compute_text_metrics
    from kubetune_trainer.settings import KNOWN_METRICS, LOSS_METRICS, WATCHABLE_METRICS

    preds, refs = ["red apple", "blue sea"], ["red apple", "gold coin"]
    text = [m for m in KNOWN_METRICS if m not in (*LOSS_METRICS, "semantic_similarity")]
    logged = {k for k, v in compute_text_metrics(text, preds, refs).items() if isinstance(v, int | float)}
    assert set(WATCHABLE_METRICS) == {"loss", *LOSS_METRICS, "semantic_similarity", *logged}
    for name in ("rouge1", "eval_rougeL", "rouge2"):
        cfg = FinetuningConfig(
            model_name="m",
            train_file="t.jsonl",
            validation_split=0.1,
            metrics=["rouge"],
            early_stopping={"metric": name},
        )
        assert cfg.early_stopping is not None and cfg.early_stopping.maximize
