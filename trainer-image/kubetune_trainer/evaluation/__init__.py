"""Evaluation: metric functions and the guide's ModelEvaluator API (torch-free)."""

from kubetune_trainer.evaluation.evaluator import (
    EvaluationMetric,
    EvaluationReport,
    MetricType,
    ModelEvaluator,
    load_dataset_rows,
)
from kubetune_trainer.evaluation.metrics import (
    bleu,
    classification_report,
    compute_text_metrics,
    exact_match,
    normalize_answer,
    perplexity,
    rouge,
    semantic_similarity,
    token_f1,
)

__all__ = [
    "EvaluationMetric",
    "EvaluationReport",
    "MetricType",
    "ModelEvaluator",
    "bleu",
    "classification_report",
    "compute_text_metrics",
    "exact_match",
    "load_dataset_rows",
    "normalize_answer",
    "perplexity",
    "rouge",
    "semantic_similarity",
    "token_f1",
]
