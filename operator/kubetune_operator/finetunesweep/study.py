"""The Optuna study of a FineTuneSweep, rebuilt from the observed trials on every reconcile.

No database and no state in the operator's memory: each trial's parameters live on its child
FineTuneJob (annotation kubetune.io/trial), its evaluations and pruner bookkeeping in the
sweep's status rows. From those the study is rebuilt with `create_trial` + `add_trial`
(finished, pruned and failed trials with their values, running trials as RUNNING, so the
samplers do not hand their points out again), and Optuna's ask-and-tell interface decides
the next trial's parameters and whether a running trial is pruned.

Trial numbers equal child numbers: trial N is the FineTuneJob <sweep>-N. A number without a
child (deleted by hand) is added as a FAIL placeholder so `ask()` returns the next free number.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState, create_trial

from kubetune_trainer.search import space

from ..api.finetunesweep import INTEGER_PATHS, FineTuneSweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)

# Optuna's state of each trial phase kept in the sweep's status.
STATES = {
    "Succeeded": TrialState.COMPLETE,
    "Pruned": TrialState.PRUNED,
    "Failed": TrialState.FAIL,
    "Pending": TrialState.RUNNING,
    "Running": TrialState.RUNNING,
}


@dataclass
class Record:
    """One trial as observed: what the study needs to know about it."""

    number: int
    params: dict[str, Any]
    phase: str
    objective: float | None = None
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    rungs: dict[str, float] = field(default_factory=dict)


def _number(v: float | None, integer: bool) -> Any:
    """A parameter's number as the search space takes it: an int for integer fields, and
    otherwise as the API server's JSON carries it (a whole number without its ``.0``)."""
    if v is None:
        return None
    return int(v) if integer or float(v).is_integer() else v


def parameters(spec: FineTuneSweepSpec) -> list[space.Parameter]:
    """The sweep's parameters as search-space Parameters (integers for integer fields).

    Raises space.SearchSpaceError for a space the API's rules let through but Optuna cannot use.
    """
    out = []
    for p in spec.parameters:
        integer = p.path in INTEGER_PATHS
        item: dict[str, Any] = {"path": p.path}
        if p.values is not None:
            item["values"] = [_number(v, integer) for v in p.values]
        elif p.choices is not None:
            item["values"] = list(p.choices)
        else:
            item.update(min=_number(p.min, integer), max=_number(p.max, integer), scale=p.scale)
            if p.step is not None:
                item["step"] = _number(p.step, integer)
        out.append(item)
    params = space.parse_space(out)
    # Optuna's GridSampler lists every point of the grid, on every rebuild: the space's bound
    # keeps a typo (step 1e-9) from taking the operator's memory. Counted, never listed.
    size = space.grid_size(params) if spec.algorithm == "grid" else None
    if size is not None and size > space.MAX_GRID_POINTS:
        raise space.SearchSpaceError(
            f"the grid has {size} points, more than {space.MAX_GRID_POINTS}: use fewer values or larger "
            "steps, or algorithm random or tpe with maxTrials"
        )
    return params


def total_trials(spec: FineTuneSweepSpec, params: Sequence[space.Parameter]) -> int:
    """Trials the sweep runs: maxTrials, capped at the grid's size for grid."""
    max_trials = spec.max_trials
    if spec.algorithm == "grid":
        size = space.grid_size(params) or 0
        return min(size, max_trials) if max_trials else size
    return max_trials or 0


def early_stopping(spec: FineTuneSweepSpec) -> dict[str, Any] | None:
    """The pruner's settings, by their API names (space.make_pruner reads those)."""
    es = spec.early_stopping
    return None if es is None else es.model_dump(by_alias=True, exclude_none=True)


@dataclass
class Search:
    """A rebuilt study and what it was built from."""

    study: optuna.Study
    sampler: optuna.samplers.BaseSampler
    distributions: dict[str, optuna.distributions.BaseDistribution]
    trial_ids: dict[int, int]  # trial number -> storage id


def rebuild(
    spec: FineTuneSweepSpec, params: Sequence[space.Parameter], records: Sequence[Record], next_number: int
) -> Search:
    algorithm = spec.algorithm
    seed = spec.seed
    # A grid's point order comes from its seed and must not change between reconciles; random and
    # TPE draw from a generator that a rebuilt study starts afresh, so each trial gets its own
    # seed (the sweep's seed + the trial number): reproducible, and never the same draw twice.
    sampler_seed = seed if algorithm == "grid" else seed + next_number
    sampler = space.make_sampler(algorithm, sampler_seed, params, max_trials=spec.max_trials)
    direction = spec.objective.direction
    study = optuna.create_study(
        direction=direction, sampler=sampler, pruner=space.make_pruner(early_stopping(spec))
    )
    dists = space.distributions(params)
    by_number = {r.number: r for r in records}
    ids: dict[int, int] = {}
    for number in range(next_number):
        r = by_number.get(number)
        frozen = _frozen(r, dists, sampler) if r is not None else None
        if frozen is None:
            frozen = create_trial(state=TrialState.FAIL, params={}, distributions={})
        study.add_trial(frozen)
        ids[number] = study._storage.get_all_trials(study._study_id, deepcopy=False)[-1]._trial_id
    return Search(study, sampler, dists, ids)


def _frozen(
    r: Record, dists: Mapping[str, optuna.distributions.BaseDistribution], sampler: Any
) -> optuna.trial.FrozenTrial | None:
    state = STATES.get(r.phase, TrialState.RUNNING)
    if set(r.params) != set(dists):
        return None  # the space changed since this trial ran: it informs nothing now
    attrs: dict[str, Any] = dict(r.rungs)
    if isinstance(sampler, optuna.samplers.GridSampler):
        try:
            attrs.update(space.grid_attrs(sampler, r.params))
        except space.SearchSpaceError:
            return None
    value = r.objective if state == TrialState.COMPLETE else None
    if state == TrialState.COMPLETE and value is None:
        state = TrialState.FAIL
    try:
        frozen = create_trial(
            state=state,
            params=dict(r.params),
            distributions=dict(dists),
            value=value,
            intermediate_values=dict(r.evaluations),
            system_attrs=attrs,
        )
        frozen._validate()
    except ValueError as e:  # a value outside the current space
        log.info("trial %d does not fit the current search space (%s): left out of the study", r.number, e)
        return None
    return frozen


def should_prune(search: Search, number: int) -> tuple[bool, dict[str, float]]:
    """Ask the pruner about running trial `number`; also its rung bookkeeping after the call."""
    storage = search.study._storage
    trial = storage.get_trial(search.trial_ids[number])
    if trial.state != TrialState.RUNNING or trial.last_step is None:
        return False, {}
    pruned = bool(search.study.pruner.prune(search.study, trial))
    attrs = storage.get_trial(search.trial_ids[number]).system_attrs
    rungs = {k: float(v) for k, v in attrs.items() if k.startswith("completed_rung_")}
    return pruned, rungs


def ask(search: Search) -> dict[str, Any]:
    """The parameters of the next trial (whose number is the study's trial count)."""
    trial = search.study.ask(search.distributions)
    return dict(trial.params)
