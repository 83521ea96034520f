"""FineTuneSweep (kubetune.io/v1alpha1): a hyperparameter search over FineTuneJobs.

A sweep holds a FineTuneJob spec (`template`) and a search space (`parameters`, each a dotted
path into that spec). The operator asks Optuna for trial parameters, runs each trial as a child
FineTuneJob, stops unpromising trials early from the evaluations they report in
status.progress, and reports the best trial (whose adapter an AdapterDeployment can serve
through `fineTuneSweepRef`).

The tunable paths are read off the FineTuneJob models themselves (TUNABLE below), so a new
hyperparameter field becomes tunable without touching this file, and the CEL rule that rejects
an unknown path lists exactly those.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field

from kubetune_trainer.apimodel import ApiModel, KindModel, ListType, Rule, rules, unwrap
from kubetune_trainer.search.space import (
    DEFAULT_REDUCTION_FACTOR,
    DEFAULT_STARTUP_TRIALS,
    DEFAULT_WARMUP_STEPS,
    Algorithm,
    Direction,
    Scale,
)
from kubetune_trainer.settings import (
    WATCHABLE,
    Hyperparameters,
    LoraParams,
    PrefixParams,
    PromptParams,
    PTuningParams,
    QLoraParams,
)

from .common import URI_MAX, Conditions
from .finetunejob import Dataset, FineTuneJobSpec, Method, Replay
from .finetunejob import Phase as JobPhase

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
TrialPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Pruned"]
PruningRule = Literal["median", "successiveHalving"]

# Trial N of sweep S is the FineTuneJob "S-N" (N < MAX_TRIALS), which must fit in 63 characters.
MAX_TRIALS = 1000
NAME_MAX = 63 - len(f"-{MAX_TRIALS - 1}")
# Evaluations kept per trial in status (the whole sweep is one object, under etcd's size limit).
MAX_EVALUATIONS = 100


# ---- the tunable paths, read off the FineTuneJob models ------------------------------------------


def _leaf_kind(annotation: Any) -> tuple[str, list[str]] | None:
    """("integer" | "number" | "string", enum values) for a scalar field that can be tuned."""
    core, _ = unwrap(annotation)
    origin = get_origin(core)
    if origin in (Union, types.UnionType):
        return None
    if origin is Literal:
        values = list(get_args(core))
        if all(isinstance(v, str) for v in values):
            return "string", values
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "integer", []
        return None
    if core is int:
        return "integer", []
    if core is float:
        return "number", []
    return None


# path -> [(operator, bound)] of the numeric fields, from the models' ge/gt/le/lt.
BOUNDS: dict[str, list[tuple[str, float]]] = {}
_BOUND_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _add(path: str, info: Any, out: dict[str, tuple[str, list[str]]]) -> None:
    kind = _leaf_kind(info.annotation)
    if kind is None:
        return
    out[path] = kind
    bounds = [
        (op, float(getattr(m, attr)))
        for m in info.metadata
        for attr, op in _BOUND_OPS
        if getattr(m, attr, None) is not None
    ]
    if bounds and kind[0] != "string":
        BOUNDS[path] = bounds


def _walk(model: type[BaseModel], prefix: str, out: dict[str, tuple[str, list[str]]]) -> None:
    for name, info in model.model_fields.items():
        _add(f"{prefix}{info.alias or name}", info, out)


def _tunable() -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    _walk(Hyperparameters, "hyperparameters.", out)
    _add("method.type", Method.model_fields["type"], out)
    for block, model in (
        ("lora", LoraParams),
        ("qlora", QLoraParams),
        ("prefix", PrefixParams),
        ("prompt", PromptParams),
        ("ptuning", PTuningParams),
    ):
        _walk(model, f"method.{block}.", out)
    for name in ("max_seq_length", "validation_split"):
        info = Dataset.model_fields[name]
        _add(f"dataset.{info.alias}", info, out)
    _walk(Replay, "dataset.replay.", out)
    return out


# path -> (JSON type, allowed strings for enum fields)
TUNABLE: dict[str, tuple[str, list[str]]] = _tunable()
NUMERIC_PATHS = [p for p, (k, _) in TUNABLE.items() if k in ("integer", "number")]
INTEGER_PATHS = [p for p, (k, _) in TUNABLE.items() if k == "integer"]
STRING_PATHS = [p for p, (k, _) in TUNABLE.items() if k == "string"]
METHOD_BLOCKS = ("lora", "qlora", "prefix", "prompt", "ptuning")


def _cel_list(items: list[str]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _cel_enum_map() -> str:
    return "{" + ", ".join(f"'{p}': {_cel_list(TUNABLE[p][1])}" for p in STRING_PATHS) + "}"


def _is_int(v: float) -> bool:
    return math.isfinite(v) and float(int(v)) == v


# ---- spec ----------------------------------------------------------------------------------------


_PY_OPS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}


def _within(path: str) -> Callable[[SweepParameter], bool]:
    def check(p: SweepParameter) -> bool:
        if p.path != path:
            return True
        points = [*(p.values or []), *(x for x in (p.min, p.max) if x is not None)]
        return all(_PY_OPS[op](v, b) for v in points for op, b in BOUNDS[path])

    return check


def _bound_rule(path: str) -> Rule:
    def cel(x: str) -> str:
        return " && ".join(f"{x} {op} {b!r}" for op, b in BOUNDS[path])

    shown = " and ".join(f"{op} {b:g}" for op, b in BOUNDS[path])
    return Rule(
        f"self.path != '{path}' || ((!has(self.values) || self.values.all(v, {cel('v')})) && "
        f"(!has(self.min) || ({cel('self.min')})) && (!has(self.max) || ({cel('self.max')})))",
        f"{path} takes values {shown} (the FineTuneJob's bounds): keep values, min and max within them",
        check=_within(path),
        field_path=".path",
    )


@rules(
    *(_bound_rule(path) for path in BOUNDS),
    Rule(
        "[has(self.values), has(self.choices), has(self.min) || has(self.max)].filter(x, x).size() == 1",
        "each parameter needs exactly one of values (a list of numbers), choices (a list of strings) or "
        "min and max (a range)",
        check=lambda p: (
            [p.values is not None, p.choices is not None, p.min is not None or p.max is not None].count(True)
            == 1
        ),
    ),
    Rule(
        "has(self.min) == has(self.max)",
        "a range needs both min and max",
        check=lambda p: (p.min is None) == (p.max is None),
        field_path=".max",
        reason="FieldValueRequired",
    ),
    Rule(
        "!has(self.min) || !has(self.max) || self.min < self.max",
        "min must be below max (for a single value, use values: [x])",
        check=lambda p: p.min is None or p.max is None or p.min < p.max,
        field_path=".max",
    ),
    Rule(
        "self.scale != 'log' || !has(self.min) || self.min > 0.0",
        "scale log needs min > 0 (the logarithm of 0 or less is undefined): raise min or use scale linear",
        check=lambda p: p.scale != "log" or p.min is None or p.min > 0,
        field_path=".min",
    ),
    Rule(
        "!has(self.step) || has(self.min)",
        "step only applies to a range: set min and max, or remove step",
        check=lambda p: p.step is None or p.min is not None,
        field_path=".step",
        reason="FieldValueForbidden",
    ),
    Rule(
        "!has(self.step) || self.scale != 'log'",
        "step works only with scale linear (Optuna cannot step a log scale): remove step or set scale: linear",
        check=lambda p: p.step is None or p.scale != "log",
        field_path=".step",
        reason="FieldValueForbidden",
    ),
    Rule(
        f"self.path in {_cel_list(list(TUNABLE))}",
        "parameters[].path must be a tunable field of the FineTuneJob spec (camelCase, dotted): one of "
        + ", ".join(TUNABLE),
        check=lambda p: p.path in TUNABLE,
        field_path=".path",
    ),
    Rule(
        f"!(self.path in {_cel_list(STRING_PATHS)}) || has(self.choices)",
        "this path takes strings: list them under choices (e.g. choices: [cosine, linear])",
        check=lambda p: p.path not in STRING_PATHS or p.choices is not None,
        field_path=".path",
    ),
    Rule(
        f"!(self.path in {_cel_list(NUMERIC_PATHS)}) || !has(self.choices)",
        "this path takes numbers: use values (a list of numbers) or min and max, not choices",
        check=lambda p: p.path not in NUMERIC_PATHS or p.choices is None,
        field_path=".choices",
        reason="FieldValueForbidden",
    ),
    Rule(
        f"!(self.path in {_cel_list(STRING_PATHS)}) || !has(self.choices) || "
        f"self.choices.all(c, c in {_cel_enum_map()}[self.path])",
        "choices must be values the field accepts (see kubectl explain finetunejob.spec for the field)",
        check=lambda p: (
            p.path not in STRING_PATHS or p.choices is None or all(c in TUNABLE[p.path][1] for c in p.choices)
        ),
        field_path=".choices",
    ),
    Rule(
        f"!(self.path in {_cel_list(INTEGER_PATHS)}) || ((!has(self.values) || self.values.all(v, "
        "double(int(v)) == v)) && (!has(self.min) || double(int(self.min)) == self.min) && "
        "(!has(self.max) || double(int(self.max)) == self.max) && "
        "(!has(self.step) || double(int(self.step)) == self.step))",
        "this path is an integer: values, min, max and step must be whole numbers",
        check=lambda p: (
            p.path not in INTEGER_PATHS
            or all(
                _is_int(v) for v in [*(p.values or []), *(x for x in (p.min, p.max, p.step) if x is not None)]
            )
        ),
        field_path=".path",
    ),
)
class SweepParameter(ApiModel):
    """One dimension of the search space: a field of the template and the values it may take."""

    path: str = Field(
        max_length=128,
        description="Dotted camelCase path into the template's FineTuneJob spec, e.g. "
        "hyperparameters.learningRate or method.lora.r.",
    )
    values: list[float] | None = Field(
        None, min_length=1, max_length=64, description="The numbers to try (grid or categorical)."
    )
    choices: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="The strings to try, for fields such as hyperparameters.scheduler or method.lora.bias.",
    )
    min: float | None = Field(None, description="Lower end of a range (inclusive).")
    max: float | None = Field(None, description="Upper end of a range (inclusive).")
    scale: Scale = Field(
        "linear", description="How a range is sampled: linear, or log (for learning rates; needs min > 0)."
    )
    step: float | None = Field(
        None,
        gt=0,
        description="Spacing of a linear range: values min, min+step, ... up to max (a max off that grid is "
        "not tried: min 8, max 30, step 8 tries 8, 16, 24). Makes a range a grid.",
    )


class Objective(ApiModel):
    """What a trial is judged by: a metric in the trial's final status.metrics."""

    metric: str = Field(
        "eval_loss",
        max_length=64,
        description="A metric the trainer reports: eval_loss, perplexity, or one of the template's "
        "evaluation.metrics (e.g. exact_match).",
    )
    direction: Direction = Field(
        "minimize", description="minimize (losses, perplexity) or maximize (exact_match, bleu ...)."
    )


@rules(
    Rule(
        "self.rule == 'median' || !has(self.startupTrials)",
        "startupTrials belongs to the median rule: remove it, or use rule: median",
        check=lambda e: e.rule == "median" or e.startup_trials is None,
        field_path=".startupTrials",
        reason="FieldValueForbidden",
    ),
    Rule(
        "self.rule == 'successiveHalving' || !has(self.minResource)",
        "minResource belongs to successive halving: remove it, or use rule: successiveHalving",
        check=lambda e: e.rule == "successiveHalving" or e.min_resource is None,
        field_path=".minResource",
        reason="FieldValueForbidden",
    ),
)
class SweepEarlyStopping(ApiModel):
    """Stop unpromising trials from the evaluations they report while they run (status.progress)."""

    rule: PruningRule = Field(
        "median",
        description="median: stop a trial whose evaluation is worse than the median of the other trials at "
        "the same step; successiveHalving: keep only the best 1/reductionFactor at each rung of steps.",
    )
    startup_trials: int | None = Field(
        None,
        ge=0,
        le=1000,
        description=f"median: trials that finish before any is stopped (default {DEFAULT_STARTUP_TRIALS}).",
    )
    warmup_steps: int = Field(
        DEFAULT_WARMUP_STEPS,
        ge=0,
        le=100000000,
        description="median: steps a trial runs before it can be stopped.",
    )
    min_resource: int | None = Field(
        None,
        ge=1,
        le=100000000,
        description="successiveHalving: steps of the first rung (default: Optuna's estimate from the first trial).",
    )
    reduction_factor: int = Field(
        DEFAULT_REDUCTION_FACTOR,
        ge=2,
        le=100,
        description="successiveHalving: 1 in reductionFactor trials goes on at each rung.",
    )


def _metric_ok(s: FineTuneSweepSpec) -> bool:
    m = s.objective.metric
    ev = s.template.evaluation
    base = m.removeprefix("eval_")
    return (
        base in ("loss", "perplexity")
        or base in ev.metrics
        or ("rouge" in ev.metrics and base.startswith("rouge"))
    )


def _block_ok(block: str) -> Callable[[FineTuneSweepSpec], bool]:
    def check(s: FineTuneSweepSpec) -> bool:
        return (
            all(not p.path.startswith(f"method.{block}.") for p in s.parameters)
            or s.template.method.type == block
            or any(p.path == "method.type" for p in s.parameters)
        )

    return check


def _finite(p: SweepParameter) -> bool:
    return (
        p.values is not None
        or p.choices is not None
        or p.step is not None
        or (p.path in INTEGER_PATHS and p.scale == "linear")
    )


@rules(
    Rule(
        "self.algorithm != 'grid' || self.parameters.all(p, has(p.values) || has(p.choices) || has(p.step) || "
        f"(p.path in {_cel_list(INTEGER_PATHS)} && p.scale == 'linear'))",
        "algorithm grid needs a finite set for every parameter: give each range a step (or use values or "
        "choices), or use algorithm random or tpe",
        check=lambda s: s.algorithm != "grid" or all(_finite(p) for p in s.parameters),
        field_path=".parameters",
    ),
    Rule(
        "self.algorithm == 'grid' || has(self.maxTrials)",
        "algorithms random and tpe need maxTrials (how many trials to run in all)",
        check=lambda s: s.algorithm == "grid" or s.max_trials is not None,
        field_path=".maxTrials",
        reason="FieldValueRequired",
    ),
    Rule(
        "!has(self.maxTrials) || self.parallelism <= self.maxTrials",
        "parallelism must be at most maxTrials (more trials cannot run at once than run in all)",
        check=lambda s: s.max_trials is None or s.parallelism <= s.max_trials,
        field_path=".parallelism",
    ),
    Rule(
        f"self.objective.metric in {WATCHABLE}",
        "objective.metric must be a number the trainer reports: eval_loss, perplexity, or a scalar metric such "
        "as exact_match, bleu, rougeL or accuracy",
        check=lambda s: s.objective.metric in WATCHABLE,
        field_path=".objective.metric",
    ),
    Rule(
        "self.objective.metric in ['loss', 'eval_loss', 'perplexity', 'eval_perplexity'] || "
        "self.template.evaluation.metrics.exists(m, self.objective.metric == m || self.objective.metric == "
        "'eval_' + m) || ('rouge' in self.template.evaluation.metrics && "
        "self.objective.metric.replace('eval_', '').startsWith('rouge'))",
        "objective.metric is not computed by the trials: add it to template.evaluation.metrics, or use eval_loss",
        check=_metric_ok,
        field_path=".objective.metric",
    ),
    Rule(
        "has(self.template.dataset.validation) || has(self.template.dataset.validationSplit)",
        "a sweep compares trials on validation data: set template.dataset.validation or "
        "template.dataset.validationSplit",
        check=lambda s: (
            s.template.dataset.validation is not None or s.template.dataset.validation_split is not None
        ),
        field_path=".template.dataset",
        reason="FieldValueRequired",
    ),
    Rule(
        "!self.template.runPolicy.suspend",
        "template.runPolicy.suspend would start every trial suspended, and the sweep would wait forever: "
        "remove it (the sweep suspends the trials it stops early itself)",
        check=lambda s: not s.template.run_policy.suspend,
        field_path=".template.runPolicy.suspend",
        reason="FieldValueForbidden",
    ),
    Rule(
        "!has(self.earlyStopping) || self.objective.metric in ['loss', 'eval_loss']",
        "earlyStopping compares the evaluations trials report while they run, and they report eval_loss "
        "(status.progress.evalLoss): set objective.metric to eval_loss, or remove earlyStopping",
        check=lambda s: s.early_stopping is None or s.objective.metric in ("loss", "eval_loss"),
        field_path=".earlyStopping",
    ),
    Rule(
        "!has(self.earlyStopping) || self.objective.direction == 'minimize'",
        "earlyStopping on eval_loss stops the trials whose loss is high: objective.direction must be minimize",
        check=lambda s: s.early_stopping is None or s.objective.direction == "minimize",
        field_path=".objective.direction",
    ),
    *(
        Rule(
            f"self.parameters.all(p, !p.path.startsWith('method.{block}.')) || self.template.method.type == "
            f"'{block}' || self.parameters.exists(p, p.path == 'method.type')",
            f"a parameter under method.{block} needs template.method.type {block}: set it, or tune another "
            "method's parameters",
            check=_block_ok(block),
            field_path=".parameters",
        )
        for block in METHOD_BLOCKS
    ),
)
class FineTuneSweepSpec(ApiModel):
    """The FineTuneJob to vary, the search space, the search algorithm and its budget."""

    template: FineTuneJobSpec = Field(
        description="The FineTuneJob spec every trial starts from; each trial sets its parameters in a copy."
    )
    parameters: Annotated[list[SweepParameter], ListType("map", ("path",))] = Field(
        min_length=1,
        max_length=16,
        description="The search space: one entry per field to vary (unique paths).",
    )
    algorithm: Algorithm = Field(
        "grid",
        description="grid (every combination), random, or tpe (Optuna's Tree-structured Parzen Estimator, "
        "which learns from the finished trials).",
    )
    seed: int = Field(
        0, ge=0, le=4294967295, description="Seed of the sampler: the same seed asks the same trials."
    )
    max_trials: int | None = Field(
        None,
        ge=1,
        le=MAX_TRIALS,
        description="Trials to run in all. Default for grid: the size of the grid. Required for random and tpe.",
    )
    parallelism: int = Field(1, ge=1, le=100, description="Trials running at the same time.")
    objective: Objective = Field(
        default_factory=Objective, description="The metric the best trial is chosen by."
    )
    early_stopping: SweepEarlyStopping | None = Field(
        None,
        description="Stop unpromising trials from their intermediate evaluations (needs objective eval_loss). "
        "A stopped trial is suspended: its slot is freed, its record and checkpoints are kept.",
    )


# ---- status --------------------------------------------------------------------------------------


class TrialEvaluation(ApiModel):
    """An intermediate evaluation a trial reported (status.progress.evalLoss at a step)."""

    step: int = Field(ge=0, description="Optimizer step of the evaluation.")
    value: float = Field(description="eval_loss at that step.")


ParameterValues = dict[str, Annotated[str, Field(max_length=64)]]


class TrialStatus(ApiModel):
    """One trial: its FineTuneJob, parameters, state and result."""

    name: str = Field(max_length=63, description="The trial's FineTuneJob (same namespace).")
    number: int = Field(ge=0, description="Trial number (the FineTuneJob is <sweep>-<number>).")
    parameters: ParameterValues | None = Field(
        None, max_length=16, description="The parameter values of this trial, by path."
    )
    phase: TrialPhase = Field("Pending", description="Pending, Running, Succeeded, Failed or Pruned.")
    job_phase: JobPhase | None = Field(None, description="The FineTuneJob's own phase.")
    objective: float | None = Field(
        None, description="The objective metric (final, or the latest evaluation)."
    )
    step: int | None = Field(None, ge=0, description="Optimizer steps reached.")
    evaluations: list[TrialEvaluation] | None = Field(
        None,
        max_length=MAX_EVALUATIONS,
        description=f"Intermediate evaluations seen (what early stopping compares; the last {MAX_EVALUATIONS}).",
    )
    adapter_uri: str | None = Field(
        None, max_length=URI_MAX, description="The trial's adapter, once it succeeded."
    )
    message: str = Field("", max_length=1024, description="Why the trial is in its phase.")


class BestTrial(ApiModel):
    """The best trial so far."""

    name: str = Field(max_length=63, description="The trial's FineTuneJob.")
    parameters: ParameterValues | None = Field(
        None, max_length=16, description="Its parameter values, by path."
    )
    objective: float | None = Field(None, description="Its objective metric.")
    adapter_uri: str | None = Field(None, max_length=URI_MAX, description="Where its adapter is.")


class FineTuneSweepStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(
        None, description="Pending, Running, Succeeded (all trials done, a best trial found) or Failed."
    )
    trials: Annotated[list[TrialStatus], ListType("map", ("name",))] | None = Field(
        None, max_length=MAX_TRIALS, description="One row per trial, in trial order."
    )
    best_trial: BestTrial | None = Field(None, description="The best finished trial so far.")
    total_trials: int | None = Field(
        None, ge=0, description="Trials the sweep will run (maxTrials or grid size)."
    )
    created: int | None = Field(None, ge=0, description="Trials started so far.")
    running: int | None = Field(None, ge=0, description="Trials running now.")
    succeeded: int | None = Field(None, ge=0, description="Trials that finished.")
    pruned: int | None = Field(None, ge=0, description="Trials stopped early.")
    failed: int | None = Field(None, ge=0, description="Trials that failed.")
    completed: str | None = Field(
        None, max_length=32, description="Finished trials / all trials, e.g. 3/8 (TRIALS column)."
    )
    conditions: Conditions | None = Field(None, max_length=32, description="Details of the current state.")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this status reflects."
    )


class FineTuneSweep(KindModel):
    """A hyperparameter search: runs FineTuneJobs with parameters chosen by Optuna (grid, random or TPE),
    stops unpromising ones early, and reports the best trial, whose adapter an AdapterDeployment can serve."""

    __name_rules__ = (
        Rule(
            f"size(self) <= {NAME_MAX}",
            f"metadata.name of a FineTuneSweep must be at most {NAME_MAX} characters (its trials are named "
            "<name>-<number>); choose a shorter name",
            check=lambda name: len(name) <= NAME_MAX,
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        "kubetune.io/v1alpha1", description="kubetune.io/v1alpha1"
    )
    kind: Literal["FineTuneSweep"] = Field("FineTuneSweep", description="FineTuneSweep")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneSweepSpec = Field(
        description="The FineTuneJob to vary, the search space, the search algorithm and its budget."
    )
    status: FineTuneSweepStatus | None = Field(None, description="Observed state (read-only for users).")
