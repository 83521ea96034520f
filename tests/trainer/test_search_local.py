"""HyperparameterSearch and `kubetune sweep --local` with real tiny trainings (no faked metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

from kubetune_trainer import FinetuningConfig, HyperparameterSearch
from kubetune_trainer.cli import main
from kubetune_trainer.exit_codes import ConfigError, ExitCode
from kubetune_trainer.quickstart import make_task_records
from kubetune_trainer.search.space import distributions, make_sampler, parse_space

GOOD_LR, BAD_LR = (
    3e-3,
    1e-6,
)  # on the tiny model, a few steps at 3e-3 lower eval_loss clearly; 1e-6 hardly moves it


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("search-data")
    rows = make_task_records(48, seed=3)
    return {"train": _write(d / "train.jsonl", rows[:32]), "validation": _write(d / "val.jsonl", rows[32:48])}


def _config(model: Path, data: dict[str, Path], out: Path, **kw) -> FinetuningConfig:
    base = {
        "model_name": str(model),
        "train_file": str(data["train"]),
        "validation_file": str(data["validation"]),
        "output_dir": str(out),
        "method": "lora",
        "max_steps": 4,
        "eval_steps": 2,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "progress_bar": False,
        "precision": "fp32",
        "seed": 0,
    }
    return FinetuningConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def grid_search(tiny_model_dir: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("grid")
    search = HyperparameterSearch(
        _config(tiny_model_dir, data, out / "unused"),
        space={"learning_rate": [BAD_LR, GOOD_LR], "lora.r": [2, 4]},
        objective="eval_loss",
        direction="minimize",
        output_dir=out,
        progress_bar=False,
    )
    return search, search.run(), out


def test_grid_runs_every_point_once_and_ranks_what_ran(grid_search):
    search, results, _ = grid_search
    assert sorted((r.params["learning_rate"], r.params["lora.r"]) for r in results) == sorted(
        (lr, r) for lr in (BAD_LR, GOOD_LR) for r in (2, 4)
    )
    assert [r.state for r in results] == ["complete"] * 4
    # The objective of each row is what its trial's own evaluation wrote to disk.
    for row in results:
        written = json.loads((Path(row.output_dir) / "metrics.json").read_text())["eval"]["eval_loss"]
        assert row.objective == pytest.approx(written)
        assert row.step == 4
        assert row.intermediate and max(row.intermediate) == 4
        # the trial really trained with its parameters
        adapter = json.loads((Path(row.output_dir) / "adapter_config.json").read_text())
        assert adapter["r"] == row.params["lora.r"]
    losses = [r.objective for r in results]
    assert losses == sorted(losses)  # best first
    assert search.best is results[0]
    assert search.best.objective == min(losses)
    assert search.best.params["learning_rate"] == GOOD_LR
    assert min(r.objective for r in results if r.params["learning_rate"] == BAD_LR) > search.best.objective


def test_results_are_written_best_first(grid_search):
    search, results, out = grid_search
    doc = json.loads((out / "results.json").read_text())
    assert doc["best"]["name"] == search.best.name
    assert [t["name"] for t in doc["trials"]] == [r.name for r in results]
    table = (out / "results.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["trial", "state", "eval_loss"]
    assert table[1].split()[0] == search.best.name


def _first_grid_lr(seed: int) -> float:
    params = parse_space({"learning_rate": [GOOD_LR, BAD_LR]})
    study = optuna.create_study(sampler=make_sampler("grid", seed, params))
    return study.ask(distributions(params)).params["learning_rate"]


def test_median_rule_prunes_the_bad_trial_early(tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path):
    # a seed whose grid runs the good learning rate first, so the bad one is compared with it
    seed = next(s for s in range(20) if _first_grid_lr(s) == GOOD_LR)
    search = HyperparameterSearch(
        _config(tiny_model_dir, data, tmp_path, max_steps=6),
        space={"learning_rate": [GOOD_LR, BAD_LR]},
        seed=seed,
        early_stopping={"rule": "median", "startup_trials": 1},
        output_dir=tmp_path,
        progress_bar=False,
    )
    results = search.run()
    good, bad = results
    assert (good.state, good.params["learning_rate"], good.step) == ("complete", GOOD_LR, 6)
    assert (bad.state, bad.params["learning_rate"]) == ("pruned", BAD_LR)
    assert bad.step == 2  # stopped at its first evaluation instead of running 6 steps
    assert bad.intermediate[2] > good.intermediate[2]
    assert not (Path(bad.output_dir) / "adapter_config.json").exists()
    assert search.best is good
    assert search.study.trials[1].state == optuna.trial.TrialState.PRUNED


def test_random_search_is_reproducible_with_its_seed(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
):
    def run(seed: int, out: Path) -> list[dict]:
        search = HyperparameterSearch(
            _config(tiny_model_dir, data, out, max_steps=1, eval_steps=None),
            space={
                "learning_rate": {"min": 1e-5, "max": 1e-2, "scale": "log"},
                "lora.r": {"min": 2, "max": 8},
            },
            algorithm="random",
            max_trials=2,
            seed=seed,
            output_dir=out,
            progress_bar=False,
        )
        rows = sorted(search.run(), key=lambda r: r.number)
        assert all(r.state == "complete" and math.isfinite(r.objective) for r in rows)
        assert all(
            isinstance(r.params["lora.r"], int) and 1e-5 <= r.params["learning_rate"] <= 1e-2 for r in rows
        )
        return [r.params for r in rows]

    first = run(11, tmp_path / "a")
    assert run(11, tmp_path / "b") == first
    assert first[0] != first[1]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"space": {"lerning_rate": [1e-4]}},
            "'lerning_rate' is not a FinetuningConfig field (did you mean 'learning_rate'?)",
        ),
        ({"space": {"learning_rate": [1e-4, 2.0]}}, "learning_rate=2.0"),
        ({"space": {"learning_rate": {"min": 1e-4, "max": 1e-3}}}, "algorithm grid needs values or a step"),
        (
            {"space": {"learning_rate": [1e-4]}, "objective": "exact_match"},
            "add 'exact_match' to the config's metrics",
        ),
        ({"space": {"learning_rate": [1e-4]}, "direction": "down"}, "unknown direction 'down'"),
        ({"space": {"learning_rate": [1e-4]}, "early_stopping": {"rule": "hyperband"}}, "earlyStopping rule"),
    ],
)
def test_bad_searches_fail_before_training(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, kw, message
):
    with pytest.raises(ConfigError) as info:
        HyperparameterSearch(_config(tiny_model_dir, data, tmp_path), progress_bar=False, **kw)
    assert message in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing trained


def test_search_needs_validation_data(tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path):
    cfg = _config(tiny_model_dir, data, tmp_path, validation_file=None, eval_steps=None)
    with pytest.raises(ConfigError, match="set validation_file or validation_split"):
        HyperparameterSearch(cfg, space={"learning_rate": [1e-4]})


SWEEP = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneSweep
metadata:
  name: cli-sweep
spec:
  template:
    baseModel: {{uri: {model}}}
    dataset:
      train: {{uri: {train}}}
      validation: {{uri: {validation}}}
    method: {{type: lora, lora: {{r: 4}}}}
    hyperparameters: {{maxSteps: 2, batchSizePerDevice: 8, precision: fp32}}
    distributed: {{strategy: ddp}}
  parameters:
    - path: hyperparameters.learningRate
      values: [{bad}, {good}]
  objective: {{metric: eval_loss, direction: minimize}}
  parallelism: 2
"""


def test_cli_sweep_runs_the_manifest_locally(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, capsys
):
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(
        SWEEP.format(model=tiny_model_dir, bad=BAD_LR, good=GOOD_LR, **{k: str(v) for k, v in data.items()})
    )
    out = tmp_path / "out"
    assert main(["sweep", str(manifest), "--local", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trial-000" in printed and "trial-001" in printed
    doc = json.loads((out / "results.json").read_text())
    assert [t["state"] for t in doc["trials"]] == ["complete", "complete"]
    best = doc["best"]
    assert best["params"] == {"hyperparameters.learningRate": GOOD_LR}
    assert best["objective"] == min(t["objective"] for t in doc["trials"])
    assert f"best: {best['name']}" in printed
    assert (Path(best["output_dir"]) / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("kind: FineTuneSweep", "kind: FineTuneJob"), "expected kind: FineTuneSweep"),
        (
            lambda s: s.replace("hyperparameters.learningRate", "hyperparameters.learnigRate"),
            "'hyperparameters.learnigRate' is not a tunable field of the FineTuneJob spec (did you mean "
            "'hyperparameters.learningRate'?)",
        ),
        (
            lambda s: s.replace("values: [1e-06, 0.003]", "min: 0.0001\n      max: 0.001"),
            "algorithm grid needs values or a step",
        ),
        (lambda s: s.replace("metric: eval_loss", "metric: bleu"), "add 'bleu' to the config's metrics"),
    ],
)
def test_cli_sweep_bad_manifests_exit_with_a_config_error(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, capsys, edit, message
):
    manifest = tmp_path / "sweep.yaml"
    text = SWEEP.format(
        model=tiny_model_dir, bad=BAD_LR, good=GOOD_LR, **{k: str(v) for k, v in data.items()}
    )
    manifest.write_text(edit(text))
    assert (
        main(["sweep", str(manifest), "--local", "--output-dir", str(tmp_path / "out")])
        == ExitCode.BAD_CONFIG
    )
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
