"""Hyperparameter search: the search space (torch-free, shared with the operator) and
``HyperparameterSearch``, which runs the trials of a sweep on this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune_trainer.search.local import HyperparameterSearch, TrialResult

__all__ = ["HyperparameterSearch", "TrialResult"]


def __getattr__(name: str) -> Any:
    # Lazy: `import kubetune_trainer.search.space` (the operator) must not import the trainer.
    if name in __all__:
        from kubetune_trainer.search import local

        return getattr(local, name)
    raise AttributeError(f"module 'kubetune_trainer.search' has no attribute {name!r}")
