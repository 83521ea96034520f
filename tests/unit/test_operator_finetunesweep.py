"""FineTuneSweep's pure parts: trial builders and the Optuna study rebuilt from observed trials."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_operator.api import load_finetunejob, load_finetunesweep
from kubetune_operator.api.finetunejob import FineTuneJobStatus
from kubetune_operator.api.finetunesweep import FineTuneSweepSpec
from kubetune_operator.finetunesweep import builders, study
from kubetune_trainer.search import space
from kubetune_trainer.settings import Evaluation
from tests.unit.test_api_cases import finetunesweep

LR, RANK = "hyperparameters.learningRate", "method.lora.r"


def stored(patch: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sweep as the API server stores it (defaults applied), with metadata the server adds."""
    obj = finetunesweep("s")
    obj["spec"].update(patch or {})
    out = load_finetunesweep(obj).to_manifest()
    out["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
    return out


def spec_of(sweep: dict[str, Any]) -> FineTuneSweepSpec:
    """The typed spec, as the reconcile reads it."""
    return load_finetunesweep(sweep).spec


def grid_spec() -> dict[str, Any]:
    return stored({"parameters": [{"path": LR, "values": [1e-4, 3e-4]}, {"path": RANK, "values": [8, 16]}]})


def test_trial_job_is_the_template_with_the_parameters_owned_and_labelled() -> None:
    sweep = grid_spec()
    job = builders.trial_job(sweep, 3, {LR: 3e-4, RANK: 16})
    assert job["metadata"]["name"] == "s-3"
    assert job["metadata"]["labels"]["kubetune.io/finetunesweep"] == "s"
    assert job["metadata"]["labels"]["kubetune.io/trial"] == "3"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    assert json.loads(job["metadata"]["annotations"]["kubetune.io/trial"]) == {
        "number": 3,
        "params": {LR: 3e-4, RANK: 16},
    }
    assert job["spec"]["hyperparameters"]["learningRate"] == 3e-4
    assert job["spec"]["method"]["lora"]["r"] == 16
    # The template itself is untouched, and the trial is a valid FineTuneJob.
    assert sweep["spec"]["template"]["hyperparameters"]["learningRate"] == 2e-4
    load_finetunejob(job)
    assert builders.trial_number(job) == 3 and builders.trial_params(job) == {LR: 3e-4, RANK: 16}


def test_api_parameters_become_integer_distributions_for_integer_fields() -> None:
    spec = spec_of(
        stored(
            {
                "algorithm": "random",
                "maxTrials": 5,
                "parameters": [
                    {"path": RANK, "min": 4, "max": 64},
                    {"path": LR, "min": 1e-5, "max": 1e-3, "scale": "log"},
                ],
            }
        )
    )
    params = study.parameters(spec)
    dists = space.distributions(params)
    assert type(dists[RANK]).__name__ == "IntDistribution"
    assert dists[LR].log is True  # type: ignore[attr-defined]
    assert study.total_trials(spec, params) == 5


def test_grid_total_is_the_grid_size_capped_by_max_trials() -> None:
    spec = spec_of(grid_spec())
    assert study.total_trials(spec, study.parameters(spec)) == 4
    spec.max_trials = 3
    assert study.total_trials(spec, study.parameters(spec)) == 3


def test_grid_asks_every_point_once_counting_running_trials() -> None:
    spec = spec_of(grid_spec())
    params = study.parameters(spec)
    records: list[study.Record] = []
    for n in range(4):
        asked = study.ask(study.rebuild(spec, params, records, n))
        # The earlier ones are still running (or done): the grid never hands a point out twice.
        records.append(study.Record(n, asked, "Running" if n % 2 else "Succeeded", objective=1.0))
    points = sorted((r.params[LR], r.params[RANK]) for r in records)
    assert points == [(1e-4, 8), (1e-4, 16), (3e-4, 8), (3e-4, 16)]


def test_random_is_reproducible_per_trial_and_never_repeats_a_draw() -> None:
    spec = spec_of(
        stored(
            {
                "algorithm": "random",
                "maxTrials": 4,
                "seed": 7,
                "parameters": [{"path": LR, "min": 1e-5, "max": 1e-3}],
            }
        )
    )
    params = study.parameters(spec)
    first = study.ask(study.rebuild(spec, params, [], 0))
    again = study.ask(study.rebuild(spec, params, [], 0))
    assert first == again  # a restarted operator asking for trial 0 again asks the same
    second = study.ask(study.rebuild(spec, params, [study.Record(0, first, "Running")], 1))
    assert second != first


def test_a_missing_trial_number_keeps_the_numbering() -> None:
    spec = spec_of(grid_spec())
    params = study.parameters(spec)
    only = study.Record(2, {LR: 1e-4, RANK: 8}, "Succeeded", objective=0.5)
    search = study.rebuild(spec, params, [only], 3)
    assert [t.number for t in search.study.trials] == [0, 1, 2]
    assert search.study.trials[2].value == 0.5
    trial = search.study.ask(search.distributions)
    assert trial.number == 3


def test_median_rule_prunes_a_trial_worse_than_the_finished_ones_at_the_same_step() -> None:
    spec = spec_of(
        stored(
            {
                "parameters": [{"path": LR, "values": [1e-4, 2e-4, 3e-4]}],
                "earlyStopping": {"startupTrials": 1},
            }
        )
    )
    params = study.parameters(spec)
    done = study.Record(0, {LR: 1e-4}, "Succeeded", objective=1.4, evaluations=[(10, 2.0), (20, 1.5)])
    good = study.Record(1, {LR: 2e-4}, "Running", evaluations=[(10, 1.8)])
    bad = study.Record(2, {LR: 3e-4}, "Running", evaluations=[(10, 1.9), (20, 3.0)])
    search = study.rebuild(spec, params, [done, good, bad], 3)
    assert study.should_prune(search, 1)[0] is False
    assert study.should_prune(search, 2)[0] is True


def test_successive_halving_keeps_its_rungs_between_rebuilds() -> None:
    spec = spec_of(
        stored(
            {
                "parameters": [{"path": LR, "values": [1e-4, 2e-4, 3e-4]}],
                "earlyStopping": {"rule": "successiveHalving", "minResource": 10, "reductionFactor": 2},
            }
        )
    )
    params = study.parameters(spec)
    first = study.Record(0, {LR: 1e-4}, "Running", evaluations=[(10, 1.0)])
    search = study.rebuild(spec, params, [first], 1)
    pruned, rungs = study.should_prune(search, 0)
    assert pruned is False and rungs == {"completed_rung_0": 1.0}
    first.rungs = rungs
    worse = study.Record(1, {LR: 2e-4}, "Running", evaluations=[(10, 5.0)])
    search = study.rebuild(spec, params, [first, worse], 2)
    assert study.should_prune(search, 1)[0] is True


@pytest.mark.parametrize(
    ("evaluation", "step", "want"),
    [({"everySteps": 10}, 23, 20), ({"everySteps": 10, "strategy": "epoch"}, 23, 23), ({}, 23, 23)],
)
def test_a_late_progress_report_is_dated_to_its_evaluation(evaluation: dict, step: int, want: int) -> None:
    assert builders.eval_step(step, Evaluation.model_validate(evaluation, by_alias=True)) == want


def test_evaluations_record_each_new_eval_loss_once() -> None:
    evaluation = Evaluation(every_steps=10)

    def status(step: int, loss: float) -> FineTuneJobStatus:
        job = {"metadata": {}, "status": {"progress": {"step": step, "evalLoss": loss}}}
        return builders.trial_status(job)

    evs = builders.observe_evaluations(None, status(10, 2.0), evaluation)
    evs = builders.observe_evaluations(evs, status(14, 2.0), evaluation)  # a training-step report: same eval
    evs = builders.observe_evaluations(evs, status(21, 1.5), evaluation)
    assert evs == [{"step": 10, "value": 2.0}, {"step": 20, "value": 1.5}]


def test_trial_phase_and_objective() -> None:
    ok = {"metadata": {}, "status": {"phase": "Succeeded", "metrics": {"eval_loss": 0.7}}}
    assert builders.objective_value(ok["status"]["metrics"], "eval_loss") == 0.7
    assert builders.objective_value({"eval_perplexity": 2.0}, "perplexity") == 2.0
    assert builders.trial_phase(ok, builders.trial_status(ok), 0.7)[0] == "Succeeded"
    assert builders.trial_phase(ok, builders.trial_status(ok), None) == (
        "Failed",
        "finished without the objective metric in status.metrics",
    )
    pruned = {
        "metadata": {"annotations": {builders.ANNOTATION_PRUNED: '{"step": 20, "value": 3.0}'}},
        "status": {},
    }
    phase, msg = builders.trial_phase(pruned, builders.trial_status(pruned), None)
    assert phase == "Pruned" and "step 20" in msg
    assert builders.prune_patch(20, 3.0)["spec"] == {"runPolicy": {"suspend": True}}


def test_a_huge_grid_is_refused_before_optuna_lists_it() -> None:
    spec = spec_of(stored({"parameters": [{"path": LR, "min": 1e-6, "max": 1e-3, "step": 1e-9}]}))
    with pytest.raises(space.SearchSpaceError, match="the grid has 999001 points, more than 100000"):
        study.parameters(spec)


class _RecordingKube:
    """Answers the reconcile's reads with one stored sweep and no trials; records status writes."""

    def __init__(self, sweep: dict[str, Any]) -> None:
        self.sweep = sweep
        self.status_patches: list[dict[str, Any]] = []

    def get(self, *a: Any) -> dict[str, Any]:
        return self.sweep

    def list(self, *a: Any, **kw: Any) -> list[dict[str, Any]]:
        return []

    def patch_status(self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]) -> None:
        self.status_patches.append(status)

    def post_event(self, *a: Any) -> None:
        pass

    def create(self, *a: Any) -> None:
        raise AssertionError("a sweep whose spec is invalid must not start trials")


def test_a_sweep_stored_before_a_rule_it_breaks_fails_once_naming_the_field() -> None:
    from kubetune_operator.controller import Store
    from kubetune_operator.finetunesweep import reconcile

    sweep = stored()
    sweep["spec"].update(maxTrials=2, parallelism=3)  # what the API server would now refuse
    kube = _RecordingKube(sweep)
    reconcile.reconcile(kube, Store(), ("team-a", "s"))  # type: ignore[arg-type]
    [patch] = kube.status_patches
    assert patch["phase"] == "Failed" and patch["observedGeneration"] == 1
    failed = next(c for c in patch["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.parallelism: parallelism must be at most maxTrials" in failed["message"]
    # The next pass finds nothing new to write: no loop of errors or patches.
    kube.sweep = {**sweep, "status": patch}
    reconcile.reconcile(kube, Store(), ("team-a", "s"))  # type: ignore[arg-type]
    assert len(kube.status_patches) == 1
