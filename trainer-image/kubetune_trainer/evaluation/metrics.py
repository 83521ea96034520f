"""Metric functions on plain Python values (no model, no torch).

Implemented with sacrebleu and rouge-score rather than the ``evaluate`` library, which
downloads metric code from a hub at run time (unreachable in clusters without egress).

Scales: BLEU is sacrebleu's corpus score on 0-100 (the scale papers report); every other
metric is in [0, 1]; perplexity is exp(mean token negative log-likelihood).
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    if not predictions:
        raise ValueError("no examples to score: the evaluation dataset is empty")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def perplexity(mean_nll: float) -> float:
    """exp of the mean per-token negative log-likelihood (e.g. Trainer's eval_loss)."""
    if math.isnan(mean_nll):
        return math.nan
    return math.exp(min(mean_nll, 700.0))  # exp(700) is near float max; beyond that is inf anyway


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after SQuAD normalisation."""
    _check_lengths(predictions, references)
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def _token_f1(prediction: str, reference: str) -> float:
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: 1; one empty: 0
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD-style token-overlap F1."""
    _check_lengths(predictions, references)
    return sum(_token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation), 0-100. Needs answers of several words to mean much."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)  # (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


OTHER_LABEL = "<other>"


def _label(text: str) -> str:
    """Classification labels compare case- and punctuation-insensitively on the first line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return normalize_answer(first)


def classification_report(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and the confusion matrix; references are the labels.

    A prediction that is none of the reference labels counts as wrong and appears in the
    confusion matrix's ``<other>`` column.
    """
    _check_lengths(predictions, references)
    refs = [_label(r) for r in references]
    labels = sorted(set(refs))
    preds = [p if p in labels else OTHER_LABEL for p in (_label(x) for x in predictions)]
    columns = [*labels, OTHER_LABEL]
    matrix = [[0] * len(columns) for _ in labels]
    for p, r in zip(preds, refs, strict=True):
        matrix[labels.index(r)][columns.index(p)] += 1
    precisions: list[float] = []
    recalls: list[float] = []
    f1s: list[float] = []
    for i in range(len(labels)):
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        precisions.append(prec)
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    n = len(labels)
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs),
        "precision": sum(precisions) / n,
        "recall": sum(recalls) / n,
        "f1": sum(f1s) / n,
        "confusion_matrix": {"labels": labels, "columns": columns, "matrix": matrix},
    }


def semantic_similarity(
    predictions: Sequence[str], references: Sequence[str], model_name_or_path: str | None
) -> float:
    """Mean cosine similarity of sentence embeddings (needs sentence-transformers and a local model)."""
    _check_lengths(predictions, references)
    model = _sentence_transformer(check_semantic_similarity(model_name_or_path))
    a = model.encode(list(predictions), convert_to_tensor=True, normalize_embeddings=True)
    b = model.encode(list(references), convert_to_tensor=True, normalize_embeddings=True)
    return float((a * b).sum(dim=-1).mean().item())


def check_semantic_similarity(model_name_or_path: str | None) -> str:
    """Raise the error semantic_similarity would raise, without loading anything; returns the model."""
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is None:
        raise RuntimeError(
            "metric 'semantic_similarity' needs the sentence-transformers package: "
            "`pip install sentence-transformers` (kubetune's `semantic` extra), or remove the metric"
        )
    if not model_name_or_path:
        raise ValueError(
            "metric 'semantic_similarity' needs an embedding model: pass "
            "ModelEvaluator(semantic_model='path/to/sentence-transformer')"
        )
    return model_name_or_path


@functools.lru_cache(maxsize=2)
def _sentence_transformer(model_name_or_path: str) -> Any:
    """Loaded once per process, not at every evaluation."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_name_or_path)


# name -> function(predictions, references) returning a float or a dict of named values
TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], Any]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "bleu": bleu,
    "rouge": rouge,
    "rouge1": lambda p, r: rouge(p, r)["rouge1"],
    "rouge2": lambda p, r: rouge(p, r)["rouge2"],
    "rougeL": lambda p, r: rouge(p, r)["rougeL"],
    "accuracy": lambda p, r: classification_report(p, r)["accuracy"],
    "precision": lambda p, r: classification_report(p, r)["precision"],
    "recall": lambda p, r: classification_report(p, r)["recall"],
    "f1": lambda p, r: classification_report(p, r)["f1"],
    "confusion_matrix": lambda p, r: classification_report(p, r)["confusion_matrix"],
}


def compute_text_metrics(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    semantic_model: str | None = None,
) -> dict[str, Any]:
    """Compute several text metrics at once (classification and ROUGE computed once each)."""
    out: dict[str, Any] = {}
    cls: dict[str, Any] | None = None
    rg: dict[str, float] | None = None
    for name in names:
        if name in ("accuracy", "precision", "recall", "f1", "confusion_matrix"):
            cls = cls or classification_report(predictions, references)
            out[name] = cls[name]
        elif name in ("rouge", "rouge1", "rouge2", "rougeL"):
            rg = rg or rouge(predictions, references)
            if name == "rouge":
                out.update(rg)
            else:
                out[name] = rg[name]
        elif name == "semantic_similarity":
            out[name] = semantic_similarity(predictions, references, semantic_model)
        elif name in TEXT_METRICS:
            out[name] = TEXT_METRICS[name](predictions, references)
        else:
            raise ValueError(
                f"unknown metric {name!r}; known: {', '.join([*TEXT_METRICS, 'semantic_similarity'])}"
            )
    return out
