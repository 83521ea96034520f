"""The torch-free search space shared by HyperparameterSearch and the FineTuneSweep operator."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from kubetune_trainer.search.space import (
    EarlyStopping,
    SearchSpaceError,
    best_of,
    distribution,
    distributions,
    grid_attrs,
    grid_size,
    make_pruner,
    make_sampler,
    parse_space,
    rank_rows,
    set_path,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_python_form_and_api_form_parse_to_the_same_parameters():
    python = parse_space({"learning_rate": {"min": 1e-5, "max": 1e-3, "scale": "log"}, "lora.r": [4, 8]})
    api = parse_space(
        [
            {"path": "learning_rate", "min": 1e-5, "max": 1e-3, "scale": "log"},
            {"path": "lora.r", "values": [4, 8]},
        ]
    )
    assert python == api
    assert python[1].values == [4, 8]


def test_distributions_keep_integers_integer():
    r, lr, batch = parse_space(
        {"r": {"min": 4, "max": 16, "step": 4}, "lr": {"min": 1e-5, "max": 1e-3, "scale": "log"}, "b": [4, 8]}
    )
    assert distribution(r) == optuna.distributions.IntDistribution(4, 16, step=4)
    assert distribution(lr) == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert distribution(batch) == optuna.distributions.CategoricalDistribution([4, 8])
    assert r.grid_values() == [4, 8, 12, 16]


def test_float_grid_points_are_rounded_and_include_max():
    (p,) = parse_space({"warmup_ratio": {"min": 0.0, "max": 0.3, "step": 0.1}})
    assert p.grid_values() == [0.0, 0.1, 0.2, 0.3]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "space is empty"),
        ({"x": []}, "values is empty"),
        ({"x": [1, 1]}, "listed twice"),
        ({"x": {"min": 1}}, "needs both min and max"),
        ({"x": {"min": 2, "max": 1}}, "must be less than max"),
        ({"x": {"min": 0, "max": 1, "scale": "log"}}, "scale log needs min > 0"),
        (
            {"x": {"min": 1e-5, "max": 1e-3, "scale": "log", "step": 1e-5}},
            "log-scale float range has no step",
        ),
        ({"x": {"values": [1], "min": 0, "max": 1}}, "either values or min/max"),
        ({"x": {"min": 0, "max": 1, "step": 2}}, "step (2) is larger than max - min"),
        ({"x": {"min": 0, "max": 1, "step": -1}}, "greater than 0"),
        ({"x": {"min": 0, "max": 1, "scale": "cubic"}}, "'linear' or 'log'"),
        ({"x": {"min": 0, "max": 1, "stepp": 1}}, "stepp"),
        ({"x": 3}, "expected a list of values or a mapping"),
        ([{"path": "x", "values": [1]}, {"path": "x", "values": [2]}], "listed twice: x"),
    ],
)
def test_bad_spaces_name_the_parameter_and_the_fix(space, message):
    with pytest.raises(SearchSpaceError, match=r"x|space") as info:
        parse_space(space)
    assert message in str(info.value)


def test_grid_over_a_range_needs_a_step():
    params = parse_space({"learning_rate": {"min": 1e-4, "max": 1e-3}})
    assert grid_size(params) is None
    with pytest.raises(SearchSpaceError, match=r"learning_rate.*algorithm grid needs values or a step"):
        make_sampler("grid", 0, params)
    assert isinstance(make_sampler("random", 0, params), optuna.samplers.RandomSampler)
    # an integer range is a grid of every integer
    assert grid_size(parse_space({"r": {"min": 1, "max": 4}, "b": [1, 2]})) == 8


def test_a_huge_grid_is_refused_without_listing_it():
    params = parse_space({"lr": {"min": 0.0, "max": 1.0, "step": 1e-9}, "r": [4, 8]})
    assert grid_size(params) == 2 * (10**9 + 1)
    with pytest.raises(SearchSpaceError, match=r"the grid has 2000000002 points, more than 100000"):
        make_sampler("grid", 0, params)
    assert isinstance(make_sampler("tpe", 0, params, max_trials=20), optuna.samplers.TPESampler)


def test_unknown_algorithm():
    with pytest.raises(SearchSpaceError, match=r"unknown algorithm .bayes..*grid, random, tpe"):
        make_sampler("bayes", 0, parse_space({"x": [1]}))


def _asked(sampler_algorithm: str, seed: int, n: int, space: dict) -> list[dict]:
    params = parse_space(space)
    study = optuna.create_study(sampler=make_sampler(sampler_algorithm, seed, params, max_trials=n))
    out = []
    for _ in range(n):
        trial = study.ask(distributions(params))
        out.append(trial.params)
        study.tell(trial, sum(float(v) for v in trial.params.values()))
    return out


def test_grid_visits_every_point_once():
    space = {"lr": [1e-4, 1e-3, 1e-2], "r": {"min": 4, "max": 8, "step": 4}}
    asked = _asked("grid", 3, 6, space)
    assert sorted((p["lr"], p["r"]) for p in asked) == sorted(
        (lr, r) for lr in (1e-4, 1e-3, 1e-2) for r in (4, 8)
    )


@pytest.mark.parametrize("algorithm", ["grid", "random", "tpe"])
def test_a_seed_reproduces_the_trials(algorithm):
    space = {
        "lr": {"min": 1e-5, "max": 1e-2, "scale": "log"} if algorithm != "grid" else [1e-5, 1e-4, 1e-3],
        "b": [2, 4, 8],
    }
    assert _asked(algorithm, 7, 6, space) == _asked(algorithm, 7, 6, space)
    assert _asked(algorithm, 7, 6, space) != _asked(algorithm, 8, 6, space)


def test_a_rebuilt_grid_study_never_repeats_finished_or_running_points():
    """What the operator does on every reconcile: a fresh in-memory study from the observed trials."""
    params = parse_space({"lr": [1e-4, 1e-3, 1e-2], "r": [4, 8, 16]})
    first = optuna.create_study(sampler=make_sampler("grid", 5, params))
    trials = [first.ask(distributions(params)) for _ in range(4)]
    first.tell(trials[0], 1.0)
    first.tell(trials[1], state=optuna.trial.TrialState.PRUNED)

    sampler = make_sampler("grid", 5, params)
    rebuilt = optuna.create_study(sampler=sampler)
    for old in first.trials:
        assert grid_attrs(sampler, old.params)["grid_id"] == old.system_attrs["grid_id"]
        rebuilt.add_trial(
            optuna.trial.create_trial(
                state=old.state,
                value=old.value,
                params=old.params,
                distributions=old.distributions,
                system_attrs=grid_attrs(sampler, old.params),
            )
        )
    seen = {tuple(sorted(t.params.items())) for t in first.trials}
    for _ in range(5):
        point = tuple(sorted(rebuilt.ask(distributions(params)).params.items()))
        assert point not in seen
        seen.add(point)
    assert len(seen) == 9
    with pytest.raises(SearchSpaceError, match="not a point of the grid"):
        grid_attrs(sampler, {"lr": 0.5, "r": 4})


def test_pruners():
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)
    median = make_pruner({"rule": "median", "startupTrials": 1, "warmupSteps": 2})
    assert isinstance(median, optuna.pruners.MedianPruner)
    halving = make_pruner({"rule": "successive_halving", "reduction_factor": 2, "minResource": 5})
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert EarlyStopping.model_validate({"rule": "successiveHalving"}).reduction_factor == 3
    with pytest.raises(SearchSpaceError, match="earlyStopping rule"):
        make_pruner({"rule": "hyperband"})
    with pytest.raises(SearchSpaceError, match="warmupSteps"):
        make_pruner({"rule": "median", "warmupSteps": -1})


def test_median_rule_prunes_a_trial_worse_than_the_median():
    params = parse_space({"x": [0, 1, 2]})
    study = optuna.create_study(
        sampler=make_sampler("grid", 0, params), pruner=make_pruner({"startupTrials": 2})
    )
    for value in (1.0, 2.0):
        trial = study.ask(distributions(params))
        for step in (1, 2, 3):
            trial.report(value, step)
        study.tell(trial, value)
    bad = study.ask(distributions(params))
    bad.report(5.0, 1)
    assert bad.should_prune()
    good = study.ask(distributions(params))
    good.report(0.5, 1)
    assert not good.should_prune()


def test_set_path_copies_creates_and_names_bad_paths():
    template = {"hyperparameters": {"learningRate": 1e-4}, "method": {"type": "lora"}, "data": [1]}
    out = set_path(template, "method.lora.r", 16)
    assert out["method"] == {"type": "lora", "lora": {"r": 16}}
    assert "lora" not in template["method"]  # the template is untouched
    assert set_path(template, "hyperparameters.learningRate", 1e-3)["hyperparameters"]["learningRate"] == 1e-3
    with pytest.raises(SearchSpaceError, match=r"'data' is \[1\], not a mapping"):
        set_path(template, "data.x", 1)
    with pytest.raises(SearchSpaceError, match=r"'method\.lora' does not exist"):
        set_path(template, "method.lora.r", 1, create=False)
    with pytest.raises(SearchSpaceError, match="not a dotted path"):
        set_path(template, "a..b", 1)


def test_best_of_and_rank_rows_count_finished_trials_only():
    rows = [
        {"name": "t0", "objective": 1.0, "phase": "Succeeded"},
        {"name": "t1", "objective": 0.2, "phase": "Pruned"},
        {"name": "t2", "objective": 0.7, "phase": "Succeeded"},
        {"name": "t3", "objective": None, "phase": "Failed"},
        {"name": "t4", "objective": float("nan"), "phase": "Succeeded"},
    ]
    assert best_of(rows, "minimize")["name"] == "t2"
    assert best_of(rows, "maximize")["name"] == "t0"
    assert [r["name"] for r in rank_rows(rows, "minimize")] == ["t2", "t0", "t1", "t3", "t4"]
    assert best_of([{"objective": None}], "minimize") is None


def test_space_module_imports_no_torch():
    code = (
        "import sys, kubetune_trainer.search.space, kubetune_trainer.search; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_successive_halving_keeps_the_best_of_a_rung():
    params = parse_space({"x": {"min": 0.0, "max": 1.0}})
    pruner = make_pruner({"rule": "successiveHalving", "minResource": 2, "reductionFactor": 2})
    study = optuna.create_study(sampler=make_sampler("random", 0, params), pruner=pruner)
    for value in (1.0, 2.0, 3.0):
        trial = study.ask(distributions(params))
        trial.report(value, 2)
        trial.should_prune()  # records the trial's value at the rung (what later trials compete with)
        study.tell(trial, value)
    worst = study.ask(distributions(params))
    worst.report(9.0, 2)
    assert worst.should_prune()
    best = study.ask(distributions(params))
    best.report(0.5, 2)
    assert not best.should_prune()


def test_tpe_learns_from_finished_trials():
    """After its random start-up trials TPE asks near the best region, far more often than random would."""
    params = parse_space({"x": {"min": 0.0, "max": 10.0}})
    study = optuna.create_study(sampler=make_sampler("tpe", 0, params, max_trials=8))
    asked = []
    for _ in range(24):
        trial = study.ask(distributions(params))
        asked.append(trial.params["x"])
        study.tell(trial, (trial.params["x"] - 2.0) ** 2)
    late = asked[4:]  # 4 start-up trials (half of max_trials)
    assert sum(abs(x - 2.0) < 2.0 for x in late) > len(late) / 2
