"""``kubetune sweep sweep.yaml --local``: run a FineTuneSweep manifest's trials on this machine.

Each trial sets its parameters (camelCase paths) in a copy of ``spec.template`` and converts the
result exactly as ``kubetune run job.yaml --local`` converts a FineTuneJob, so local paths work
where the cluster needs URIs (the API server's rules are not applied here, as for ``kubetune run``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.search.local import HyperparameterSearch
from kubetune_trainer.search.space import SearchSpaceError, set_path


def _convert() -> Any:
    try:
        from kubetune_operator.convert import finetunejob_to_config
    except ImportError:
        raise ConfigError(
            "running a FineTuneSweep manifest needs the operator package (kubetune_operator.convert) to "
            "convert its template; in Python, use HyperparameterSearch with a FinetuningConfig instead"
        ) from None
    return finetunejob_to_config


def load_sweep(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"sweep file {p} does not exist: pass a FineTuneSweep manifest (see docs/sweeps.md)"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "FineTuneSweep":
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        hint = " (run a FineTuneJob with `kubetune run FILE --local`)" if kind == "FineTuneJob" else ""
        raise ConfigError(f"{p}: expected kind: FineTuneSweep, got {kind!r}{hint}")
    if not isinstance(data.get("spec"), dict):
        raise ConfigError(f"{p}: spec is missing: a FineTuneSweep needs spec.template and spec.parameters")
    return data


def manifest_space(parameters: Any, source: str) -> list[dict[str, Any]]:
    """The API's parameters (``values`` for numbers, ``choices`` for strings) in the space's form."""
    if not isinstance(parameters, list) or not parameters:
        raise ConfigError(
            f"{source}: spec.parameters must list at least one parameter ({{path, values}} ...)"
        )
    space = []
    for item in parameters:
        if not isinstance(item, Mapping):
            raise ConfigError(f"{source}: spec.parameters: each entry is a mapping, got {item!r}")
        entry = dict(item)
        if "choices" in entry:
            if "values" in entry:
                raise ConfigError(
                    f"{source}: parameter {entry.get('path')!r}: give values or choices, not both"
                )
            entry["values"] = entry.pop("choices")
        space.append(entry)
    return space


def check_paths(space: list[dict[str, Any]], source: str) -> None:
    """Each path must be a tunable field of the FineTuneJob spec: a typo would otherwise add a field
    the conversion ignores, and every trial would train the same."""
    from kubetune_operator.api.finetunesweep import TUNABLE

    for entry in space:
        path = entry.get("path")
        if path not in TUNABLE:
            close = difflib.get_close_matches(str(path), list(TUNABLE), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: parameter path {path!r} is not a tunable field of the FineTuneJob spec{hint}; "
                f"tunable: {', '.join(TUNABLE)}"
            )


class ManifestSearch(HyperparameterSearch):
    """A HyperparameterSearch whose trials are the sweep's template with the parameters set."""

    def __init__(
        self,
        data: dict[str, Any],
        *,
        base_dir: Path,
        output_dir: Path | None = None,
        max_trials: int | None = None,
        progress_bar: bool = True,
        on_trial: Any = None,
        source: str = "FineTuneSweep",
    ):
        spec = data["spec"]
        self.name = str((data.get("metadata") or {}).get("name") or "sweep")
        self.template = spec.get("template")
        if not isinstance(self.template, dict):
            raise ConfigError(f"{source}: spec.template must be a FineTuneJob spec (baseModel, dataset, ...)")
        self.base_dir = base_dir
        self._to_config = _convert()
        objective = spec.get("objective") or {}
        config = self._job_config(self.template, self.name)
        space = manifest_space(spec.get("parameters"), source)
        check_paths(space, source)
        super().__init__(
            config,
            space,
            objective=objective.get("metric", "eval_loss"),
            direction=objective.get("direction", "minimize"),
            algorithm=spec.get("algorithm", "grid"),
            max_trials=max_trials or spec.get("maxTrials"),
            seed=spec.get("seed", 0),
            early_stopping=spec.get("earlyStopping"),
            output_dir=output_dir or Path(config.output_dir),
            progress_bar=progress_bar,
            on_trial=on_trial,
        )

    def _job_config(self, spec: dict[str, Any], name: str) -> FinetuningConfig:
        job = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        config = self._to_config(job, base_dir=self.base_dir)
        # A local sweep keeps its trials here: no job identity, so trials would share one S3 prefix.
        return config.model_copy(update={"storage_uri": None})

    def trial_config(self, params: Mapping[str, Any], output_dir: Path) -> FinetuningConfig:
        spec = self.template
        for path, value in params.items():
            try:
                spec = set_path(spec, path, value)
            except SearchSpaceError as exc:
                raise ConfigError(f"{exc} (paths are camelCase fields of spec.template)") from None
        where = ", ".join(f"{k}={v!r}" for k, v in params.items())
        try:
            config = self._job_config(spec, f"{self.name}-{output_dir.name}")
        except ConfigError as exc:
            raise ConfigError(f"trial with {where}: {exc}") from None
        return config.model_copy(update={"output_dir": str(output_dir), "resume": "never"})
