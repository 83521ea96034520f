"""kubetune trainer runtime.

The public API follows the Fine-Tuning Guide::

    from kubetune_trainer import ModelFinetuner, FinetuningConfig

Names are resolved lazily (PEP 562) so that ``import kubetune_trainer.config`` — what the
operator imports — never pulls in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "EvaluationMetric",
    "EvaluationReport",
    "FinetuningConfig",
    "HyperparameterSearch",
    "MetricType",
    "ModelEvaluator",
    "ModelFinetuner",
    "back_translate",
    "make_tiny_model",
    "paraphrase",
    "replace_synonyms",
]

_LAZY = {
    "FinetuningConfig": "kubetune_trainer.config",
    "ModelFinetuner": "kubetune_trainer.finetuner",
    "HyperparameterSearch": "kubetune_trainer.search.local",
    "ModelEvaluator": "kubetune_trainer.evaluation",
    "EvaluationMetric": "kubetune_trainer.evaluation",
    "EvaluationReport": "kubetune_trainer.evaluation",
    "MetricType": "kubetune_trainer.evaluation",
    "make_tiny_model": "kubetune_trainer.tiny_model",
    # The guide's data augmentation functions.
    "paraphrase": "kubetune_trainer.data.augment",
    "back_translate": "kubetune_trainer.data.augment",
    "replace_synonyms": "kubetune_trainer.data.augment",
}

if TYPE_CHECKING:
    from kubetune_trainer.config import FinetuningConfig
    from kubetune_trainer.data.augment import back_translate, paraphrase, replace_synonyms
    from kubetune_trainer.evaluation import EvaluationMetric, EvaluationReport, MetricType, ModelEvaluator
    from kubetune_trainer.finetuner import ModelFinetuner
    from kubetune_trainer.search.local import HyperparameterSearch
    from kubetune_trainer.tiny_model import make_tiny_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kubetune_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
