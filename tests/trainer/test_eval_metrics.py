"""Metric functions and the guide's ModelEvaluator API (no model needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubetune_trainer.evaluation import (
    EvaluationMetric,
    MetricType,
    ModelEvaluator,
    bleu,
    classification_report,
    compute_text_metrics,
    exact_match,
    normalize_answer,
    perplexity,
    rouge,
    token_f1,
)


def test_normalize_answer_squad_rules() -> None:
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_exact_match_and_token_f1() -> None:
    preds = ["Paris", "the red apple", "no"]
    refs = ["paris.", "red apple pie", "yes"]
    assert exact_match(preds, refs) == pytest.approx(1 / 3)
    # "red apple" vs "red apple pie": precision 1, recall 2/3 -> F1 0.8
    assert token_f1(preds, refs) == pytest.approx((1.0 + 0.8 + 0.0) / 3)
    assert token_f1([""], [""]) == 1.0
    assert token_f1(["x"], [""]) == 0.0


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        token_f1([], [])


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert math.isinf(perplexity(1e6)) or perplexity(1e6) > 1e300
    assert math.isnan(perplexity(float("nan")))


def test_bleu_and_rouge_against_known_values() -> None:
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    partial = bleu(["the cat sat on the mat", "a cat on the mat"], refs)
    assert 0 < partial < 100
    r = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(0.6)
    assert set(r) == {"rouge1", "rouge2", "rougeL"}


def test_classification_report_and_confusion_matrix() -> None:
    refs = ["positive", "positive", "negative", "negative", "neutral"]
    preds = ["Positive.", "negative", "negative", "banana", "neutral\nextra text"]
    rep = classification_report(preds, refs)
    assert rep["accuracy"] == pytest.approx(3 / 5)
    cm = rep["confusion_matrix"]
    assert cm["labels"] == ["negative", "neutral", "positive"]
    assert cm["columns"] == ["negative", "neutral", "positive", "<other>"]
    assert cm["matrix"] == [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]]
    # negative: P=1/2 R=1/2; neutral: 1/1; positive: P=1 R=1/2
    assert rep["precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert rep["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    f1_pos = 2 * 1 * 0.5 / 1.5
    assert rep["f1"] == pytest.approx((0.5 + 1 + f1_pos) / 3)


def test_compute_text_metrics_expands_rouge_and_rejects_unknown() -> None:
    out = compute_text_metrics(["rouge", "exact_match", "f1"], ["a b"], ["a b"])
    assert out["rouge1"] == out["rougeL"] == 1.0 and out["exact_match"] == 1.0 and out["f1"] == 1.0
    with pytest.raises(ValueError, match="unknown metric 'blue'"):
        compute_text_metrics(["blue"], ["a"], ["a"])


def test_model_evaluator_guide_api(tmp_path: Path) -> None:
    answers = {"capital of France?": "Paris", "2+2?": "4", "colour of the sky?": "blue"}
    dataset = [
        {"prompt": "capital of France?", "reference": "Paris"},
        {"question": "2+2?", "answer": "4"},
        {"instruction": "colour of the sky?", "output": "green"},
    ]
    evaluator = ModelEvaluator()
    evaluator.add_metric(EvaluationMetric("exact_match", MetricType.EXACT_MATCH, "answer exactly right"))
    evaluator.add_metric(EvaluationMetric("token_f1", metric_type=MetricType.TOKEN_F1))
    evaluator.add_metric(
        EvaluationMetric(
            "answer_length",
            MetricType.CUSTOM,
            "mean characters",
            compute_fn=lambda preds, refs, rows: sum(map(len, preds)) / len(preds),
        )
    )
    report = evaluator.evaluate_model("lookup", generate_func=lambda p: answers[p], dataset=dataset)
    assert report.n == 3
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert report["answer_length"] == pytest.approx((5 + 1 + 4) / 3)
    d = json.loads(report.to_json(tmp_path / "r.json"))
    assert d["metrics"]["exact_match"] == pytest.approx(2 / 3)
    assert d["descriptions"]["exact_match"] == "answer exactly right"
    assert d["samples"][0] == {"prompt": "capital of France?", "prediction": "Paris", "reference": "Paris"}
    assert json.loads((tmp_path / "r.json").read_text()) == d
    assert "exact_match" in report.summary()


def test_model_evaluator_perplexity_needs_score_func_and_uses_it(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b c"}, {"prompt": "d", "completion": "e"}]
    path = tmp_path / "ds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = ModelEvaluator([EvaluationMetric("perplexity", MetricType.CUSTOM, "Model perplexity")])
    with pytest.raises(ValueError, match="score_func"):
        ev.evaluate_model("m", None, path)
    # 3 tokens with total NLL 3*ln(4) -> perplexity 4
    report = ev.evaluate_model(
        "m", None, path, score_func=lambda p, r: (len(r.split()) * math.log(4), len(r.split()))
    )
    assert report["perplexity"] == pytest.approx(4.0)


def test_metric_definition_errors() -> None:
    with pytest.raises(ValueError, match="no compute_fn"):
        EvaluationMetric("my_score", MetricType.CUSTOM)
    with pytest.raises(ValueError, match="unknown metric_type"):
        EvaluationMetric("x", "nonsense")  # type: ignore[arg-type]
    ev = ModelEvaluator(["bleu"])
    with pytest.raises(ValueError, match="added twice"):
        ev.add_metric("bleu")
    with pytest.raises(ValueError, match=r"dataset\[0\] has fields \['foo'\]"):
        ev.evaluate_model("m", lambda p: p, [{"foo": 1}])
