"""The semantic_similarity metric with a real sentence-transformers model, built locally (no hub).

``make_tiny_sentence_transformer`` writes a random-weight one-layer BERT (the tiny BPE tokenizer of
``kubetune_trainer.tiny_model``) with mean pooling as a sentence-transformers model directory.
Its embeddings mean nothing, but they are deterministic: identical texts score 1 and different
texts less, which is what the plumbing needs. The dev venv installs the `semantic` extra, so
these tests fail (never skip) without sentence-transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.evaluation import EvaluationMetric, MetricType, ModelEvaluator, compute_text_metrics
from kubetune_trainer.evaluation.metrics import semantic_similarity
from kubetune_trainer.quickstart import make_task_records


def make_tiny_sentence_transformer(output_dir: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny sentence-transformers model (BERT encoder + mean pooling) into ``output_dir``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:  # sentence-transformers >= 5.x; `models` is the older (deprecated) home
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # pragma: no cover - older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer  # type: ignore[no-redef]

    from kubetune_trainer.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=512, seed=seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = BertModel(config)
    encoder_dir = output_dir / "encoder"
    encoder.save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    transformer = Transformer(str(encoder_dir), max_seq_length=128)
    dim = (
        transformer.get_embedding_dimension()
        if hasattr(transformer, "get_embedding_dimension")
        else transformer.get_word_embedding_dimension()
    )
    model_dir = output_dir / "sentence-model"
    SentenceTransformer(modules=[transformer, Pooling(dim, "mean")], device="cpu").save(str(model_dir))
    return model_dir


@pytest.fixture(scope="module")
def semantic_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentence_transformer(tmp_path_factory.mktemp("semantic"))


SENTENCES = ["the cat sat on the red mat", "paris is the capital of france", "1 2 3 4 5"]
UNRELATED = ["zzz qqq xx", "42 17 99 3 0", "blue whale banana"]


def test_identical_texts_score_one_and_unrelated_ones_less(semantic_model_dir: Path) -> None:
    model = str(semantic_model_dir)
    same = semantic_similarity(SENTENCES, SENTENCES, model)
    other = semantic_similarity(SENTENCES, UNRELATED, model)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= other < same - 0.02, other
    # The same through the dispatcher training uses, next to another metric.
    out = compute_text_metrics(["semantic_similarity", "exact_match"], SENTENCES, UNRELATED, model)
    assert out["semantic_similarity"] == pytest.approx(other, abs=1e-6) and out["exact_match"] == 0.0
    # The mean over pairs: one identical pair and two unrelated ones lie in between.
    mixed = semantic_similarity(SENTENCES, [SENTENCES[0], *UNRELATED[1:]], model)
    assert other < mixed < same
    with pytest.raises(ValueError, match="must pair up"):
        semantic_similarity(SENTENCES, SENTENCES[:2], model)


def test_model_evaluator_with_a_semantic_metric(semantic_model_dir: Path, tmp_path: Path) -> None:
    answers = {"capital of France?": "Paris", "2+2?": "4", "colour of the sky?": "green"}
    dataset = [
        {"prompt": "capital of France?", "reference": "Paris"},
        {"question": "2+2?", "answer": "4"},
        {"instruction": "colour of the sky?", "output": "blue"},
    ]
    evaluator = ModelEvaluator(semantic_model=str(semantic_model_dir))
    evaluator.add_metric(
        EvaluationMetric("meaning", MetricType.SEMANTIC_SIMILARITY, "cosine of sentence embeddings")
    )
    evaluator.add_metric(EvaluationMetric("exact_match", MetricType.EXACT_MATCH))
    report = evaluator.evaluate_model("lookup", generate_func=lambda p: answers[p], dataset=dataset)
    expected = semantic_similarity(["Paris", "4", "green"], ["Paris", "4", "blue"], str(semantic_model_dir))
    # Reported under the metric's own name, where its description is.
    assert report["meaning"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 < report["meaning"] < 1.0
    assert report["exact_match"] == pytest.approx(2 / 3)
    d = json.loads(report.to_json(tmp_path / "r.json"))
    assert d["descriptions"]["meaning"] == "cosine of sentence embeddings"
    assert d["metrics"]["meaning"] == pytest.approx(expected, abs=1e-6)
    assert "meaning" in report.summary()

    # A perfect generator scores 1; the built-in name works as a CUSTOM metric too.
    perfect = ModelEvaluator(["semantic_similarity"], semantic_model=str(semantic_model_dir))
    refs = {"capital of France?": "Paris", "2+2?": "4", "colour of the sky?": "blue"}
    assert perfect.evaluate_model("m", lambda p: refs[p], dataset)["semantic_similarity"] == pytest.approx(
        1.0, abs=1e-5
    )


def test_model_evaluator_semantic_errors_come_before_any_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    def generate(prompt: str) -> str:
        raise AssertionError("generate_func must not run when the metric cannot be computed")

    dataset = [{"prompt": "a", "reference": "b"}]
    with pytest.raises(ValueError, match="needs an embedding model"):
        ModelEvaluator(["semantic_similarity"]).evaluate_model("m", generate, dataset)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **kw: None if name == "sentence_transformers" else real_find_spec(name, *a, **kw),
    )
    with pytest.raises(RuntimeError, match="pip install sentence-transformers"):
        ModelEvaluator(["semantic_similarity"], semantic_model="some/model").evaluate_model(
            "m", generate, dataset
        )


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_training_reports_eval_semantic_similarity(
    tiny_model_dir: Path, semantic_model_dir: Path, tmp_path: Path
) -> None:
    rows = make_task_records(48, seed=3)
    # semantic_model relative to the YAML file, as a FineTuneJob's config would say it.
    (tmp_path / "embedder").symlink_to(semantic_model_dir, target_is_directory=True)
    job = {
        "model_name": str(tiny_model_dir),
        "output_dir": str(tmp_path / "out"),
        "train_file": str(_write(tmp_path / "train.jsonl", rows[:32])),
        "validation_file": str(_write(tmp_path / "val.jsonl", rows[32:])),
        "method": "lora",
        "max_steps": 4,
        "eval_steps": 2,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "metrics": ["perplexity", "semantic_similarity", "token_f1"],
        "semantic_model": "embedder",
        # Best-checkpoint selection watches it like any logged metric (higher is better).
        "early_stopping": {"metric": "semantic_similarity", "patience": 10},
        "eval_max_examples": 4,
        "eval_max_new_tokens": 8,
        "progress_bar": False,
        "resume": "never",
        "seed": 0,
    }
    (tmp_path / "job.yaml").write_text(json.dumps(job))  # JSON is YAML
    cfg = FinetuningConfig.from_yaml(tmp_path / "job.yaml")
    assert cfg.semantic_model == str(tmp_path / "embedder")

    ft = ModelFinetuner(cfg)
    ft.load_model()
    ft.train()
    evals = [h for h in ft.trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:  # every periodic evaluation logs it, like eval_loss
        assert -1.0 <= h["eval_semantic_similarity"] <= 1.0 + 1e-6, h
    assert ft.trainer.args.metric_for_best_model == "eval_semantic_similarity"
    assert ft.trainer.args.greater_is_better
    assert ft.trainer.state.best_metric == max(h["eval_semantic_similarity"] for h in evals)
    metrics = ft.evaluate()
    value = metrics["eval_semantic_similarity"]
    assert isinstance(value, float) and not math.isnan(value)
    assert 0.0 <= metrics["eval_token_f1"] <= 1.0
    # It is the metric of exactly the predictions that evaluation generated.
    references = [ex["reference"] for ex in ft.data.eval_examples("validation")[: cfg.eval_max_examples]]
    assert len(ft.last_predictions) == len(references) == 4
    assert value == pytest.approx(
        semantic_similarity(ft.last_predictions, references, str(semantic_model_dir)), abs=1e-5
    )
    ft.close()
