"""The search space of a hyperparameter sweep and the Optuna pieces built from it.

Torch-free (imports only optuna, pydantic and the standard library): the operator, whose
image installs no torch, rebuilds a FineTuneSweep's Optuna study from these same functions,
and ``HyperparameterSearch`` uses them for local sweeps. One definition of every setting
(algorithms, scales, pruning rules and their defaults) lives here.

A parameter is a dotted ``path`` plus either ``values`` (a grid / categorical choice) or a
``min``/``max`` range with a ``scale`` (``linear`` or ``log``) and, for grids and integer
steps, a ``step``. For a FineTuneSweep the path points into the FineTuneJob spec in camelCase
(``hyperparameters.learningRate``); in Python it names a FinetuningConfig field
(``learning_rate``, ``lora.r``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ALGORITHMS: tuple[str, ...] = ("grid", "random", "tpe")
DIRECTIONS: tuple[str, ...] = ("minimize", "maximize")
SCALES: tuple[str, ...] = ("linear", "log")
PRUNING_RULES: tuple[str, ...] = ("median", "successiveHalving")

Algorithm = Literal["grid", "random", "tpe"]
Direction = Literal["minimize", "maximize"]
Scale = Literal["linear", "log"]
Scalar = str | int | float | bool | None

# Defaults of the early-stopping rules (the FineTuneSweep API reuses these numbers).
DEFAULT_STARTUP_TRIALS = 2  # median rule: trials that finish before any is pruned
DEFAULT_WARMUP_STEPS = 0  # median rule: steps of a trial before it may be pruned
DEFAULT_REDUCTION_FACTOR = 3  # successive halving: keep the best 1/factor at each rung
# TPE samples at random until this many trials finished (Optuna's default is 10, too many
# for the small sweeps fine-tuning affords); capped at half of maxTrials.
TPE_STARTUP_TRIALS = 10

# Optuna's GridSampler lists every point: a bound keeps a typo (step 1e-9) from taking the memory.
MAX_GRID_POINTS = 100_000
_GRID_DIGITS = 12  # grid points are rounded so 0.1 + 2 * 0.1 prints as 0.3


class SearchSpaceError(ValueError):
    """A search space, early-stopping rule or path that cannot be used; the message says why."""


class Parameter(BaseModel):
    """One dimension of the search space."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(..., min_length=1, description="dotted path of the setting this parameter varies")
    values: list[Scalar] | None = Field(None, description="the values to try (grid / categorical)")
    min: int | float | None = Field(None, description="lower bound of a range")
    max: int | float | None = Field(None, description="upper bound of a range")
    scale: Scale = Field("linear", description="linear | log (log needs min > 0)")
    step: int | float | None = Field(None, gt=0, description="spacing of a range's grid / integer steps")

    @model_validator(mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in ("min", "max", "step"):
                if isinstance(data.get(key), bool):
                    raise ValueError(f"{key} must be a number, not {data[key]!r}")
        return data

    @model_validator(mode="after")
    def _check(self) -> Parameter:
        where = f"parameter {self.path!r}"
        has_range = self.min is not None or self.max is not None
        if self.values is not None and has_range:
            raise ValueError(f"{where}: give either values or min/max, not both")
        if self.values is None and not has_range:
            raise ValueError(f"{where}: give values: [...] or a range min/max")
        if self.values is not None:
            if not self.values:
                raise ValueError(f"{where}: values is empty; list at least one value")
            if self.step is not None or self.scale != "linear":
                raise ValueError(f"{where}: step and scale apply to min/max ranges, not to values")
            seen: list[Any] = []
            for v in self.values:
                if any(type(v) is type(s) and v == s for s in seen):
                    raise ValueError(f"{where}: value {v!r} is listed twice")
                seen.append(v)
            return self
        if self.min is None or self.max is None:
            raise ValueError(f"{where}: a range needs both min and max")
        if self.min >= self.max:
            raise ValueError(f"{where}: min ({self.min}) must be less than max ({self.max})")
        if self.scale == "log" and self.min <= 0:
            raise ValueError(f"{where}: scale log needs min > 0 (got {self.min})")
        if self.scale == "log" and self.step is not None and not self.is_int:
            raise ValueError(
                f"{where}: a log-scale float range has no step; list the points as values instead"
            )
        if self.step is not None and self.step > self.max - self.min:
            raise ValueError(f"{where}: step ({self.step}) is larger than max - min ({self.max - self.min})")
        return self

    @property
    def is_range(self) -> bool:
        return self.values is None

    @property
    def is_int(self) -> bool:
        """An integer range: min, max (and step, when given) are all integers."""
        return (
            self.is_range
            and isinstance(self.min, int)
            and isinstance(self.max, int)
            and (self.step is None or isinstance(self.step, int))
        )

    def grid_count(self) -> int | None:
        """How many points a grid visits for this parameter, without listing them (None: no step)."""
        if self.values is not None:
            return len(self.values)
        assert self.min is not None and self.max is not None
        step = self.step if self.step is not None else (1 if self.is_int and self.scale == "linear" else None)
        return None if step is None else _steps(self.max - self.min, step) + 1

    def grid_values(self) -> list[Any]:
        """Every point a grid visits: the values, or min, min+step, ... up to max."""
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            if self.is_int and self.scale == "linear":
                return list(range(int(self.min), int(self.max) + 1))  # type: ignore[arg-type]
            raise SearchSpaceError(
                f"parameter {self.path!r}: algorithm grid needs values or a step for the range "
                f"{self.min}..{self.max}; add step: ... or use algorithm random / tpe"
            )
        assert self.min is not None and self.max is not None
        count = _steps(self.max - self.min, self.step) + 1
        if self.is_int:
            return [int(self.min + i * self.step) for i in range(count)]
        return [round(self.min + i * self.step, _GRID_DIGITS) for i in range(count)]


def _steps(span: float, step: float) -> int:
    """Whole steps in ``span``; 0.3 / 0.1 (2.9999999999999996 in floats) counts as 3."""
    n = span / step
    return round(n) if abs(n - round(n)) <= 1e-9 * max(1.0, n) else math.floor(n)


class EarlyStopping(BaseModel):
    """How trials are stopped early, from the evaluations they report while training.

    ``median``: a trial is pruned when its best evaluation so far is worse than the median of
    the other trials' at the same step (after ``startupTrials`` trials finished and the trial
    ran ``warmupSteps`` steps). ``successiveHalving``: trials are compared at rungs of
    ``minResource`` x ``reductionFactor``^k steps, and only the best 1/``reductionFactor`` go on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    rule: Literal["median", "successiveHalving"] = Field("median", description="median | successiveHalving")
    startup_trials: int = Field(DEFAULT_STARTUP_TRIALS, ge=0, alias="startupTrials")
    warmup_steps: int = Field(DEFAULT_WARMUP_STEPS, ge=0, alias="warmupSteps")
    min_resource: int | None = Field(
        None,
        ge=1,
        alias="minResource",
        description="successive halving: steps of the first rung (null: auto)",
    )
    reduction_factor: int = Field(DEFAULT_REDUCTION_FACTOR, ge=2, alias="reductionFactor")

    @model_validator(mode="before")
    @classmethod
    def _rule_spellings(cls, data: Any) -> Any:
        # Python users may write successive_halving; the API spells it successiveHalving.
        if isinstance(data, Mapping) and data.get("rule") == "successive_halving":
            data = {**data, "rule": "successiveHalving"}
        return data


def _errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        # Model-level messages already name the parameter; field errors get "<source> <field>:".
        lines.append(f"{source} {loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def parse_space(space: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Parameter]:
    """Python form ``{path: [values...] | {min, max, scale, step}}``, or the API's list form
    ``[{path, values | min/max ...}]``, into validated parameters."""
    items: list[dict[str, Any]] = []
    if isinstance(space, Mapping):
        for path, spec in space.items():
            if isinstance(spec, Mapping):
                items.append({"path": path, **spec})
            elif isinstance(spec, list | tuple):
                items.append({"path": path, "values": list(spec)})
            else:
                raise SearchSpaceError(
                    f"space[{path!r}]: expected a list of values or a mapping {{min, max, scale, step}}, "
                    f"got {spec!r}"
                )
    elif isinstance(space, Sequence) and not isinstance(space, str):
        items = [dict(s) for s in space]
    else:
        raise SearchSpaceError(f"space: expected a mapping of parameters, got {type(space).__name__}")
    if not items:
        raise SearchSpaceError("space is empty: give at least one parameter to search over")
    params = []
    for i, item in enumerate(items):
        try:
            params.append(Parameter.model_validate(item))
        except ValidationError as exc:
            raise SearchSpaceError(_errors(exc, f"parameter {item.get('path', i)!r}")) from None
    paths = [p.path for p in params]
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:
        raise SearchSpaceError(f"space: parameter path(s) listed twice: {', '.join(dupes)}")
    return params


def distribution(p: Parameter) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one parameter (integers when min/max/step are integers)."""
    if p.values is not None:
        return optuna.distributions.CategoricalDistribution(p.values)
    assert p.min is not None and p.max is not None
    log = p.scale == "log"
    if p.is_int:
        return optuna.distributions.IntDistribution(
            int(p.min), int(p.max), log=log, step=1 if log else int(p.step or 1)
        )
    return optuna.distributions.FloatDistribution(float(p.min), float(p.max), log=log, step=p.step)


def distributions(parameters: Iterable[Parameter]) -> dict[str, optuna.distributions.BaseDistribution]:
    return {p.path: distribution(p) for p in parameters}


def grid_attrs(sampler: optuna.samplers.GridSampler, params: Mapping[str, Any]) -> dict[str, Any]:
    """The system attributes ``sampler`` gives the trial of grid point ``params``.

    A study rebuilt from observed trials (the operator's, on every reconcile) must carry them on
    each trial, running ones included, or the grid would hand out a visited point again. The
    grid id is the point's index in the sampler's (seed-shuffled) grid, which Optuna keeps in
    ``_all_grids`` ordered by ``_param_names``; the same seed gives the same ids.
    """
    names: list[str] = sampler._param_names
    missing = [n for n in names if n not in params]
    if missing:
        raise SearchSpaceError(f"trial parameters lack {', '.join(missing)}")
    point = tuple(params[n] for n in names)
    for grid_id, candidate in enumerate(sampler._all_grids):
        if all(a == b and type(a) is type(b) for a, b in zip(candidate, point, strict=True)):
            return {"search_space": sampler._search_space, "grid_id": grid_id}
    for grid_id, candidate in enumerate(sampler._all_grids):  # 8 vs 8.0 from JSON
        if candidate == point:
            return {"search_space": sampler._search_space, "grid_id": grid_id}
    raise SearchSpaceError(
        f"trial parameters {dict(params)} are not a point of the grid {sampler._search_space}"
    )


def grid_size(parameters: Sequence[Parameter]) -> int | None:
    """How many points a full grid has, or None when some range has no step (not a grid)."""
    size = 1
    for p in parameters:
        count = p.grid_count()
        if count is None:
            return None
        size *= count
    return size


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for the ask-and-tell interface.

    Optuna's stops ``study.optimize`` from ``after_trial`` once the grid is used up, which
    raises under ask-and-tell (no optimize loop); sweeps stop at ``grid_size`` themselves.
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(
    algorithm: str,
    seed: int | None,
    parameters: Sequence[Parameter],
    *,
    max_trials: int | None = None,
) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler of ``algorithm`` (grid | random | tpe)."""
    if algorithm == "grid":
        size = grid_size(parameters)
        if size is not None and size > MAX_GRID_POINTS:
            raise SearchSpaceError(
                f"the grid has {size} points, more than {MAX_GRID_POINTS}: use fewer values or larger steps, "
                "or algorithm random or tpe with a number of trials"
            )
        grid = {p.path: p.grid_values() for p in parameters}  # raises for a range with no step
        return GridSampler(grid, seed=seed)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "tpe":
        startup = (
            TPE_STARTUP_TRIALS if max_trials is None else max(1, min(TPE_STARTUP_TRIALS, max_trials // 2))
        )
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    raise SearchSpaceError(f"unknown algorithm {algorithm!r}; use one of: {', '.join(ALGORITHMS)}")


def parse_early_stopping(early_stopping: Mapping[str, Any] | EarlyStopping | None) -> EarlyStopping | None:
    if early_stopping is None or isinstance(early_stopping, EarlyStopping):
        return early_stopping
    try:
        return EarlyStopping.model_validate(dict(early_stopping))
    except ValidationError as exc:
        raise SearchSpaceError(_errors(exc, "earlyStopping")) from None


def make_pruner(early_stopping: Mapping[str, Any] | EarlyStopping | None) -> optuna.pruners.BasePruner:
    """The Optuna pruner of an early-stopping rule; NopPruner (never prunes) when None."""
    rule = parse_early_stopping(early_stopping)
    if rule is None:
        return optuna.pruners.NopPruner()
    if rule.rule == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=rule.startup_trials, n_warmup_steps=rule.warmup_steps
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=rule.min_resource if rule.min_resource is not None else "auto",
        reduction_factor=rule.reduction_factor,
    )


def study_direction(direction: str) -> optuna.study.StudyDirection:
    if direction not in DIRECTIONS:
        raise SearchSpaceError(f"unknown direction {direction!r}; use minimize or maximize")
    return (
        optuna.study.StudyDirection.MINIMIZE
        if direction == "minimize"
        else optuna.study.StudyDirection.MAXIMIZE
    )


def set_path(obj: Mapping[str, Any], path: str, value: Any, *, create: bool = True) -> dict[str, Any]:
    """A deep copy of ``obj`` with the dotted ``path`` set to ``value``.

    Missing mappings along the way are created (a template need not spell out defaults) unless
    ``create`` is false; a path that runs into a non-mapping is an error naming the path.
    """
    out = copy.deepcopy(dict(obj))
    keys = path.split(".")
    if not path or any(not k for k in keys):
        raise SearchSpaceError(
            f"parameter path {path!r} is not a dotted path like hyperparameters.learningRate"
        )
    node: Any = out
    for depth, key in enumerate(keys[:-1]):
        here = ".".join(keys[: depth + 1])
        if key not in node:
            if not create:
                raise SearchSpaceError(f"parameter path {path!r}: {here!r} does not exist in the template")
            node[key] = {}
        elif not isinstance(node[key], dict):
            raise SearchSpaceError(
                f"parameter path {path!r}: {here!r} is {node[key]!r}, not a mapping, so it has no fields to set"
            )
        node = node[key]
    if not create and keys[-1] not in node:
        raise SearchSpaceError(f"parameter path {path!r} does not exist in the template")
    node[keys[-1]] = value
    return out


def get_path(obj: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = obj
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def is_better(a: float, b: float, direction: str) -> bool:
    return a < b if direction == "minimize" else a > b


def rank_rows(rows: Iterable[Mapping[str, Any]], direction: str) -> list[Mapping[str, Any]]:
    """Rows best first: finished rows with an ``objective`` ordered by it, then the others
    (pruned, failed, running) in their original order."""
    rows = list(rows)
    scored = [r for r in rows if _scored(r)]
    rest = [r for r in rows if not _scored(r)]
    scored.sort(key=lambda r: float(r["objective"]), reverse=direction == "maximize")
    return scored + rest


def best_of(rows: Iterable[Mapping[str, Any]], direction: str) -> Mapping[str, Any] | None:
    """The finished row with the best ``objective`` (first wins a tie), or None when none has one.

    A row counts when its ``objective`` is a finite number and its ``phase``/``state`` (if
    any) says it completed: a pruned trial's last evaluation is not a finished trial's result.
    """
    best: Mapping[str, Any] | None = None
    for row in rows:
        if _scored(row) and (
            best is None or is_better(float(row["objective"]), float(best["objective"]), direction)
        ):
            best = row
    return best


_FINISHED = {"complete", "completed", "succeeded"}


def _scored(row: Mapping[str, Any]) -> bool:
    value = row.get("objective")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    state = row.get("state", row.get("phase"))
    return state is None or str(state).lower() in _FINISHED
