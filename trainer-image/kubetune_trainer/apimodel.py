"""Building blocks of the kubetune API models and of the training settings they share.

Torch-free (pydantic only): the operator image ships this module, and the trainer's settings
blocks (kubetune_trainer.settings) are declared with it, so a field, its bounds and its rules
exist once for the FineTuneJob API and for FinetuningConfig.

The pydantic models are the single source of truth: `kubetune_operator.crdgen` walks them to
render structural CRD schemas, and the same models validate manifests client-side
(`load_finetunejob`). Everything the API server checks must therefore be expressible here:

- bounds and lengths: `Field(ge=..., max_length=...)` (rendered as OpenAPI keywords),
- cross-field and format rules: `Rule` (rendered as `x-kubernetes-validations`), each with a
  Python mirror so the CLI rejects the same manifests with the same messages,
- Kubernetes schema extensions: the small marker classes below, used in `Annotated[...]`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# FieldValueDuplicate is left out on purpose: the API server prints it without the message.
Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired"]

# The error type client-side rule failures carry (ctx["field_path"] holds the rule's fieldPath).
RULE_ERROR = "kubetune_rule"
# Validation context key: {SKIP_RULES: True} validates types and bounds but not the Rules.
SKIP_RULES = "kubetune_skip_rules"


@dataclass(frozen=True)
class Rule:
    """One CEL rule of `x-kubernetes-validations`, plus its client-side mirror.

    `check` receives the value the rule is attached to (the model instance for class rules, the
    field value for field rules) and returns True when valid. Transition rules (using
    `oldSelf`) compare two versions of an object, which only the API server sees: they have
    no mirror. Every other rule must have one, so client and server never disagree silently
    (the integration tests run each invalid manifest through both).
    """

    rule: str
    message: str
    check: Callable[[Any], bool] | None = field(default=None, compare=False, repr=False)
    field_path: str | None = None
    reason: Reason | None = None
    optional_old_self: bool = False

    def __post_init__(self) -> None:
        if self.check is None and not self.is_transition:
            raise ValueError(f"rule {self.rule!r} needs a Python mirror (check=...)")
        if self.field_path is not None and not self.field_path.startswith("."):
            raise ValueError(f"fieldPath must start with '.': {self.field_path!r}")

    @property
    def is_transition(self) -> bool:
        return "oldSelf" in self.rule

    def to_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        if self.optional_old_self:
            out["optionalOldSelf"] = True
        return out


def immutable(message: str) -> Rule:
    """A transition rule that rejects any change of the field once the object exists."""
    return Rule("self == oldSelf", message, reason="FieldValueInvalid")


@dataclass(frozen=True)
class Format:
    """OpenAPI `format` (e.g. date-time); the API server validates it."""

    name: str


@dataclass(frozen=True)
class IntOrString:
    """`x-kubernetes-int-or-string`: for resource quantities such as `8` or `64Gi`."""


@dataclass(frozen=True)
class PreserveUnknownFields:
    """`x-kubernetes-preserve-unknown-fields`: only for truly free-form passthrough objects."""


@dataclass(frozen=True)
class ListType:
    """`x-kubernetes-list-type` (and list-map keys): how server-side apply merges the list."""

    type: Literal["atomic", "set", "map"]
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class SchemaExtra:
    """Schema keywords pydantic cannot express for the type (e.g. maxLength on int-or-string)."""

    keywords: dict[str, Any]

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.keywords.items())))


# ---- regular expressions shared by CEL rules and their mirrors ------------------------------------


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    # CEL's matches() is RE2 without flags: `$` means end of text. Python's `$` also matches
    # before a trailing newline, so translate a final `$` to `\Z`.
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def matches(value: str, pattern: str) -> bool:
    """Python equivalent of CEL `value.matches(pattern)` for the RE2 subset used here."""
    return _compiled(pattern).search(value) is not None


def cel_matches(expr: str, pattern: str) -> str:
    """CEL source for `expr.matches(pattern)` (a raw string literal: no escaping needed)."""
    if "'" in pattern:
        raise ValueError(f"pattern must not contain a single quote: {pattern}")
    return f"{expr}.matches(r'{pattern}')"


# ---- the model base class ----------------------------------------------------------------------------


class ApiModel(BaseModel):
    """Base of every API model: camelCase names, unknown fields rejected, JSON-like strict types.

    Strict mode matches the API server: `"3"` is not an integer and `"true"` is not a boolean.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        strict=True,
    )

    # Class-level rules, set with the @rules decorator.
    __kubetune_rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_kubetune_rules(self, info: ValidationInfo) -> ApiModel:
        if isinstance(info.context, dict) and info.context.get(SKIP_RULES):
            return self  # types and bounds only (tests feed rule-breaking settings to the trainer this way)
        cls = type(self)
        # Object rules first: where one restates a list-map uniqueness check (adapter names), the
        # client then reports the same, more helpful, message as the API server.
        for rule in class_rules(cls):
            if rule.check is not None and not rule.check(self):
                _fail(rule, prefix="")
        for name, info in cls.model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            alias = info.alias or name
            for rule in field_rules(cls, name):
                if rule.check is not None and not rule.check(value):
                    _fail(rule, prefix=f".{alias}")
            list_type = field_list_type(cls, name)
            if list_type is not None and list_type.type != "atomic":
                _check_unique(value, list_type, alias)
        return self

    def to_manifest(self) -> dict[str, Any]:
        """The JSON-compatible dict kubectl would send (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class KindModel(ApiModel):
    """Base of the two kinds: adds rules on metadata.name (the only metadata a CRD may constrain)."""

    __name_rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_name(self) -> KindModel:
        name = (getattr(self, "metadata", None) or {}).get("name")
        for rule in type(self).__name_rules__:
            if name is not None and rule.check is not None and not rule.check(name):
                _fail(rule, prefix=".metadata.name")
        return self


def _fail(rule: Rule, prefix: str) -> None:
    raise PydanticCustomError(RULE_ERROR, rule.message, {"field_path": prefix + (rule.field_path or "")})


def _check_unique(items: list[Any], list_type: ListType, alias: str) -> None:
    seen: set[Any] = set()
    for i, item in enumerate(items):
        key = tuple(_by_alias(item, k) for k in list_type.keys) if list_type.type == "map" else item
        if key in seen:
            shown = ", ".join(map(str, key)) if list_type.type == "map" else key
            raise PydanticCustomError(
                RULE_ERROR,
                "Duplicate value: {value}: entries of {field} must be unique; remove or rename the duplicate",
                {"field_path": f".{alias}[{i}]", "value": str(shown), "field": alias},
            )
        seen.add(key)


def _by_alias(obj: BaseModel, alias: str) -> Any:
    for name, info in type(obj).model_fields.items():
        if (info.alias or name) == alias:
            return getattr(obj, name)
    raise KeyError(alias)


def rules(*class_level: Rule) -> Callable[[type[ApiModel]], type[ApiModel]]:
    """Class decorator attaching object-level rules (rendered on the object's schema node)."""

    def attach(cls: type[ApiModel]) -> type[ApiModel]:
        cls.__kubetune_rules__ = class_level
        return cls

    return attach


def class_rules(cls: type[ApiModel]) -> tuple[Rule, ...]:
    """The object-level rules of cls, including those of its API base classes (in MRO order)."""
    out: list[Rule] = []
    for klass in reversed(cls.__mro__):
        for rule in klass.__dict__.get("__kubetune_rules__", ()):
            if rule not in out:
                out.append(rule)
    return tuple(out)


# ---- reading annotations ------------------------------------------------------------------------------


def unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """Strip `Optional[...]` and top-level `Annotated[...]`: (core type, metadata)."""
    meta: list[Any] = []
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp, *extra = get_args(tp)
            meta.extend(extra)
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp, meta  # a real union (int | str), left to the caller
            tp = args[0]
        else:
            return tp, meta


def field_metadata(cls: type[BaseModel], name: str) -> list[Any]:
    """All metadata of a field: pydantic's constraints and our markers, wherever they were written."""
    info = cls.model_fields[name]
    _, meta = unwrap(info.annotation)
    return [*info.metadata, *meta]


def field_rules(cls: type[BaseModel], name: str) -> list[Rule]:
    return [m for m in field_metadata(cls, name) if isinstance(m, Rule)]


def field_list_type(cls: type[BaseModel], name: str) -> ListType | None:
    return next((m for m in field_metadata(cls, name) if isinstance(m, ListType)), None)


def iter_models(root: type[BaseModel]) -> Iterator[type[ApiModel]]:
    """Every ApiModel reachable from `root` (depth first, each once)."""
    seen: set[type] = set()

    def visit(tp: Any) -> Iterator[type[ApiModel]]:
        core, _ = unwrap(tp)
        if isinstance(core, type) and issubclass(core, ApiModel):
            if core in seen:
                return
            seen.add(core)
            yield core
            for info in core.model_fields.values():
                yield from visit(info.annotation)
        for arg in get_args(core):
            yield from visit(arg)

    yield from visit(root)
