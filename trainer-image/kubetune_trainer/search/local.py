"""``HyperparameterSearch``: the guide's grid search, run on this machine with Optuna.

Each trial is a fresh ``ModelFinetuner`` on a copy of the config with the trial's parameters,
in its own directory under the search's output directory. Optuna's ask-and-tell interface picks
the parameters (grid, random or TPE, from :mod:`kubetune_trainer.search.space`); the
evaluations a trial makes while training are reported to Optuna from a Trainer callback, so
the pruner can stop a trial that is doing worse than the others. Results go to
``results.json`` and ``results.txt`` in the output directory, best trial first.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import optuna
from transformers import TrainerCallback

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.exit_codes import ConfigError, TrainerError
from kubetune_trainer.finetuner import ModelFinetuner
from kubetune_trainer.search.space import (
    ALGORITHMS,
    DIRECTIONS,
    EarlyStopping,
    Parameter,
    SearchSpaceError,
    distributions,
    grid_size,
    make_pruner,
    make_sampler,
    parse_early_stopping,
    parse_space,
    rank_rows,
    set_path,
    study_direction,
)
from kubetune_trainer.settings import LOGGED_NAMES

log = logging.getLogger(__name__)

TrialState = Literal["complete", "pruned", "failed"]
RESULTS_JSON = "results.json"
RESULTS_TABLE = "results.txt"
DEFAULT_RANDOM_TRIALS = 10  # random / tpe without max_trials


@dataclasses.dataclass
class TrialResult:
    """One trial: what it tried, how it ended, what it measured and where its adapter is."""

    number: int
    name: str
    params: dict[str, Any]
    state: TrialState
    objective: float | None  # the final objective; a pruned trial's last evaluation
    metrics: dict[str, Any]  # final eval_* metrics (empty for pruned/failed trials)
    step: int  # optimizer steps reached
    output_dir: str
    duration_s: float
    intermediate: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> objective
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _ReportToTrial(TrainerCallback):
    """Reports each evaluation's objective to the Optuna trial; stops training when pruned."""

    def __init__(self, trial: optuna.Trial, metric_key: str):
        self.trial = trial
        self.metric_key = metric_key
        self.pruned = False
        self.training = True  # off for the final evaluation, which is the trial's result, not a report
        self.intermediate: dict[int, float] = {}

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        value = (metrics or {}).get(self.metric_key)
        if not self.training or value is None or not math.isfinite(float(value)):
            return
        step = int(state.global_step)
        self.intermediate[step] = float(value)
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            log.info("trial %d pruned at step %d (%s %.4g)", self.trial.number, step, self.metric_key, value)
            self.pruned = True
            control.should_training_stop = True


class _TrialFinetuner(ModelFinetuner):
    """A ModelFinetuner whose Trainer also gets the search's callback."""

    def __init__(self, config: FinetuningConfig, extra_callback: TrainerCallback):
        super().__init__(config)
        self._search_callback = extra_callback

    def _runtime_callbacks(self) -> list[Any]:
        return [*super()._runtime_callbacks(), self._search_callback]


def objective_key(objective: str) -> str:
    """The key an objective has in the Trainer's evaluation metrics: ``eval_<metric>``."""
    return "eval_" + objective.removeprefix("eval_")


def check_objective(config: FinetuningConfig, objective: str) -> None:
    """The objective must be a number the trials' evaluations compute (clear error otherwise)."""
    if not config.has_validation:
        raise ConfigError(
            "a hyperparameter search compares trials on validation data: set validation_file or "
            "validation_split in the config"
        )
    name = objective.removeprefix("eval_")
    computed = {"loss", "perplexity", *(n for m in config.metrics for n in LOGGED_NAMES[m])}
    if name not in computed:
        known = {n for names in LOGGED_NAMES.values() for n in names} | {"loss"}
        fix = (
            f"add {name!r} to the config's metrics"
            if name in known
            else f"use one of: {', '.join(sorted(computed))}"
        )
        raise ConfigError(f"objective {objective!r} is not computed by the trials: {fix}")


class HyperparameterSearch:
    """Search hyperparameters of a FinetuningConfig by training one model per trial.

    ``space`` maps a FinetuningConfig field (a dotted path for nested blocks: ``lora.r``) to a
    list of values, or to a range ``{"min", "max", "scale": "linear"|"log", "step"}``.
    ``algorithm`` is ``grid`` (default: every combination once), ``random`` or ``tpe``;
    ``max_trials`` defaults to the grid's size (10 for random / tpe). ``early_stopping`` —
    ``{"rule": "median"}`` or ``{"rule": "successive_halving"}`` — prunes trials from their
    evaluations during training (set ``eval_steps`` so there are several).
    """

    def __init__(
        self,
        config: FinetuningConfig | Mapping[str, Any],
        space: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        objective: str = "eval_loss",
        direction: str = "minimize",
        algorithm: str = "grid",
        max_trials: int | None = None,
        seed: int | None = 0,
        early_stopping: Mapping[str, Any] | EarlyStopping | None = None,
        output_dir: str | Path | None = None,
        progress_bar: bool = True,
        on_trial: Callable[[TrialResult], None] | None = None,
    ):
        self.config = (
            config if isinstance(config, FinetuningConfig) else FinetuningConfig.from_dict(dict(config))
        )
        try:
            self.parameters: list[Parameter] = parse_space(space)
            if algorithm not in ALGORITHMS:
                raise SearchSpaceError(
                    f"unknown algorithm {algorithm!r}; use one of: {', '.join(ALGORITHMS)}"
                )
            if direction not in DIRECTIONS:
                raise SearchSpaceError(f"unknown direction {direction!r}; use minimize or maximize")
            self.early_stopping = parse_early_stopping(early_stopping)
            size = grid_size(self.parameters) if algorithm == "grid" else None
            self.sampler = make_sampler(algorithm, seed, self.parameters, max_trials=max_trials)
        except SearchSpaceError as exc:
            raise ConfigError(str(exc)) from None
        if max_trials is not None and max_trials < 1:
            raise ConfigError(f"max_trials must be at least 1 (got {max_trials})")
        self.objective = objective
        self.direction = direction
        self.algorithm = algorithm
        self.seed = seed
        self.max_trials = min(max_trials or size or DEFAULT_RANDOM_TRIALS, size or sys.maxsize)
        self.output_dir = Path(output_dir if output_dir is not None else self.config.output_dir)
        self.progress_bar = progress_bar
        self.on_trial = on_trial
        self.trials: list[TrialResult] = []
        self.study: optuna.Study | None = None
        self._check()

    # ------------------------------------------------------------------------- validation

    def _check(self) -> None:
        check_objective(self.config, self.objective)
        if self.early_stopping is not None and self.config.resolved_eval_strategy == "no":
            raise ConfigError(
                "early_stopping prunes trials from their evaluations: set eval_strategy/eval_steps"
            )
        # Every value must make a valid config before the first trial trains.
        for p in self.parameters:
            for value in p.grid_values() if p.values is not None else [p.min, p.max]:
                self.trial_config({p.path: value}, self.output_dir / "check")

    def trial_config(self, params: Mapping[str, Any], output_dir: Path) -> FinetuningConfig:
        """The config of one trial: the base config with ``params`` set, writing to ``output_dir``."""
        data = self.config.model_dump(mode="python")
        for path, value in params.items():
            try:
                data = set_path(data, path, value, create=False)
            except SearchSpaceError:
                raise ConfigError(_unknown_field(path, data)) from None
        data.update(output_dir=str(output_dir), resume="never")
        where = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return FinetuningConfig.from_dict(data, source=f"search trial ({where})")

    # ------------------------------------------------------------------------- running

    def run(self) -> list[TrialResult]:
        """Run the trials one after another; returns one row per trial, best first."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.trials = []  # a second run() starts over, as a fresh study does
        self.study = optuna.create_study(
            direction=study_direction(self.direction),
            sampler=self.sampler,
            pruner=make_pruner(self.early_stopping),
        )
        bar = _trial_bar(self.max_trials, self.progress_bar)
        try:
            for _ in range(self.max_trials):
                result = self._run_trial(self.study)
                self.trials.append(result)
                self._write_results()
                if bar is not None:
                    best = self.best
                    bar.set_postfix_str(
                        f"best {self.objective}={best.objective:.4g} ({best.name})"
                        if best
                        else "no finished trial"
                    )
                    bar.update(1)
                if self.on_trial is not None:
                    self.on_trial(result)
        finally:
            if bar is not None:
                bar.close()
        return self.results

    def _run_trial(self, study: optuna.Study) -> TrialResult:
        trial = study.ask(distributions(self.parameters))
        name = f"trial-{trial.number:03d}"
        out = self.output_dir / name
        if out.exists():  # a rerun of the same search starts its trials afresh
            shutil.rmtree(out)
        params = dict(trial.params)
        reporter = _ReportToTrial(trial, objective_key(self.objective))
        started = time.monotonic()
        finetuner = _TrialFinetuner(self.trial_config(params, out), reporter)
        state: TrialState = "failed"
        metrics: dict[str, Any] = {}
        error = None
        try:
            finetuner.load_model()
            finetuner.train()
            reporter.training = False
            if reporter.pruned:
                state = "pruned"
            else:
                metrics = finetuner.evaluate()
                finetuner.save_model()
                finetuner.write_metrics()
                state = "complete"
        except (TrainerError, DataError):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise  # bad config or data fails every trial alike: stop the search
        except Exception as exc:  # one trial failing (e.g. diverging) does not end the search
            log.warning("trial %s failed: %s", name, exc)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            step = int(finetuner.trainer.state.global_step) if finetuner.trainer is not None else 0
            finetuner.close()
            del finetuner
            _free_memory()  # the next trial loads its own base model
        value = metrics.get(objective_key(self.objective))
        if state == "complete" and (value is None or not math.isfinite(float(value))):
            state, error = "failed", f"objective {self.objective} is {value!r}"
        if state == "complete":
            study.tell(trial, float(value))  # type: ignore[arg-type]
        elif state == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            value = list(reporter.intermediate.values())[-1]
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            value = None
        return TrialResult(
            number=trial.number,
            name=name,
            params=params,
            state=state,
            objective=float(value) if value is not None else None,
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            step=step,
            output_dir=str(out),
            duration_s=round(time.monotonic() - started, 2),
            intermediate=dict(reporter.intermediate),
            error=error,
        )

    # ------------------------------------------------------------------------- results

    @property
    def results(self) -> list[TrialResult]:
        """Every trial so far, best first (finished trials by objective, then pruned and failed)."""
        rows = [{"objective": t.objective, "state": t.state, "trial": t} for t in self.trials]
        return [r["trial"] for r in rank_rows(rows, self.direction)]

    @property
    def best(self) -> TrialResult | None:
        """The finished trial with the best objective (None before one finished)."""
        ranked = self.results
        return ranked[0] if ranked and ranked[0].state == "complete" else None

    def table(self) -> str:
        return results_table(self.results, self.objective, [p.path for p in self.parameters])

    def _write_results(self) -> None:
        doc = {
            "objective": self.objective,
            "direction": self.direction,
            "algorithm": self.algorithm,
            "seed": self.seed,
            "max_trials": self.max_trials,
            "best": self.best.as_dict() if self.best else None,
            "trials": [t.as_dict() for t in self.results],
        }
        (self.output_dir / RESULTS_JSON).write_text(
            json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8"
        )
        (self.output_dir / RESULTS_TABLE).write_text(self.table() + "\n", encoding="utf-8")


def results_table(rows: Sequence[TrialResult], objective: str, paths: Sequence[str]) -> str:
    """A plain-text table, one line per trial in the given order: trial, state, objective, step, parameters."""
    lines = [table_header(objective, paths), *(table_cells(row, paths) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(format_line(line, widths) for line in lines)


def table_header(objective: str, paths: Sequence[str]) -> list[str]:
    return ["trial", "state", objective, "step", *paths]


def table_cells(row: TrialResult, paths: Sequence[str]) -> list[str]:
    value = "-" if row.objective is None else f"{row.objective:.4g}"
    return [row.name, row.state, value, str(row.step), *(_fmt(row.params.get(p)) for p in paths)]


def format_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()


def _free_memory() -> None:
    """Release the finished trial's model (Trainer and model hold reference cycles) and its GPU cache."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _unknown_field(path: str, config: Mapping[str, Any]) -> str:
    """``lerning_rate`` -> "... (did you mean 'learning_rate'?)"; nested blocks are dotted paths."""
    head, _, rest = path.rpartition(".")
    node = config
    for key in head.split(".") if head else []:
        node = node.get(key) if isinstance(node, Mapping) else None  # type: ignore[assignment]
    known = list(node) if isinstance(node, Mapping) else []
    close = difflib.get_close_matches(rest, known, n=1)
    hint = f" (did you mean {'.'.join([*filter(None, [head]), close[0]])!r}?)" if close else ""
    return (
        f"search parameter {path!r} is not a FinetuningConfig field{hint}; name a field such as "
        "learning_rate, or a nested one as lora.r"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _trial_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)
