"""Client-side validation of manifests: the same defaults and rules as the API server.

`kubetune run job.yaml --local` and the operator call these; an invalid manifest raises
`InvalidManifestError`, whose lines read like the API server's ("spec.method.lora: ...").
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError

from kubetune_trainer.apimodel import RULE_ERROR, SKIP_RULES, ApiModel

from .adapterdeployment import AdapterDeployment
from .finetunejob import FineTuneJob
from .finetunesweep import FineTuneSweep

M = TypeVar("M", bound=ApiModel)


class InvalidManifestError(ValueError):
    """A manifest the API server would reject. `errors` holds (field path, message) pairs."""

    def __init__(self, kind: str, name: str | None, errors: list[tuple[str, str]]) -> None:
        self.kind, self.name, self.errors = kind, name, errors
        what = f'{kind} "{name}"' if name else kind
        lines = "\n".join(f"  {path}: {msg}" if path else f"  {msg}" for path, msg in errors)
        super().__init__(f"{what} is invalid:\n{lines}")


def _path(loc: tuple[int | str, ...], suffix: str = "") -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return (out + suffix).lstrip(".")


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        if err["type"] == RULE_ERROR:
            out.append((_path(err["loc"], ctx.get("field_path", "")), err["msg"]))
        elif err["type"] == "extra_forbidden":
            out.append((_path(err["loc"]), "unknown field; check the spelling against `kubectl explain`"))
        else:
            out.append((_path(err["loc"]), err["msg"]))
    return out


def load_model(model: type[M], obj: dict[str, Any], *, check_rules: bool = True, strict: bool = True) -> M:
    """Validate a manifest as `model` (a kind, or a variant of one); raises InvalidManifestError."""
    if not isinstance(obj, dict):
        raise InvalidManifestError(
            model.__name__, None, [("", f"expected a mapping, got {type(obj).__name__}")]
        )
    try:
        # by_name=False: only the wire (camelCase) names are accepted, as on the API server.
        context = None if check_rules else {SKIP_RULES: True}
        return model.model_validate(obj, by_alias=True, by_name=False, context=context, strict=strict)
    except ValidationError as exc:
        name = (obj.get("metadata") or {}).get("name") if isinstance(obj.get("metadata"), dict) else None
        raise InvalidManifestError(model.__name__, name, _errors(exc)) from None


def load_finetunejob(obj: dict[str, Any]) -> FineTuneJob:
    """Validate a FineTuneJob manifest client-side; defaults are filled in as the API server would."""
    return load_model(FineTuneJob, obj)


def load_adapterdeployment(obj: dict[str, Any]) -> AdapterDeployment:
    """Validate an AdapterDeployment manifest client-side; defaults are filled in as the API server would."""
    return load_model(AdapterDeployment, obj)


def load_finetunesweep(obj: dict[str, Any]) -> FineTuneSweep:
    """Validate a FineTuneSweep manifest client-side; defaults are filled in as the API server would."""
    return load_model(FineTuneSweep, obj)
