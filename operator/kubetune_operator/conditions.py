"""Kubernetes-style status conditions (pure functions)."""

from __future__ import annotations

import datetime as dt
from typing import Any

Condition = dict[str, Any]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[Condition] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    *,
    now: str | None = None,
) -> list[Condition]:
    """Return a new list with `type_` set; lastTransitionTime changes only when the status flips."""
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    out: list[Condition] = []
    found = False
    for cond in conditions or []:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        ltt = cond.get("lastTransitionTime") if cond.get("status") == status_s else (now or now_iso())
        out.append(_condition(type_, status_s, reason, message, generation, ltt))
    if not found:
        out.append(_condition(type_, status_s, reason, message, generation, now or now_iso()))
    return out


def remove_condition(conditions: list[Condition] | None, type_: str) -> list[Condition]:
    return [dict(c) for c in conditions or [] if c.get("type") != type_]


def get_condition(conditions: list[Condition] | None, type_: str) -> Condition | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def _condition(
    type_: str, status: str, reason: str, message: str, generation: int | None, ltt: str | None
) -> Condition:
    cond: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": ltt or now_iso(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond
