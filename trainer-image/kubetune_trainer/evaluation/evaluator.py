"""The guide's evaluation API: ``ModelEvaluator``, ``EvaluationMetric``, ``MetricType``.

    evaluator = ModelEvaluator()
    evaluator.add_metric(EvaluationMetric("exact_match", MetricType.EXACT_MATCH, "answer is exactly right"))
    report = evaluator.evaluate_model("my-adapter", generate_func=lambda prompt: ..., dataset=[...])
    print(report.to_json())

``generate_func(prompt) -> str`` is any generator (a ModelFinetuner's ``generate``, an
OpenAI client ...). Perplexity needs log-likelihoods rather than text: pass
``score_func(prompt, reference) -> (sum of token NLLs, token count)``
(``ModelFinetuner.score`` is one).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_trainer.evaluation.metrics import check_semantic_similarity, compute_text_metrics, perplexity
from kubetune_trainer.settings import LOGGED_NAMES

if TYPE_CHECKING:
    from kubetune_trainer.evaluation.human import ExportResult, HumanEvalResult, SystemSpec


class MetricType(StrEnum):
    PERPLEXITY = "perplexity"
    BLEU = "bleu"
    ROUGE = "rouge"
    EXACT_MATCH = "exact_match"
    TOKEN_F1 = "token_f1"
    ACCURACY = "accuracy"
    PRECISION = "precision"
    RECALL = "recall"
    F1 = "f1"
    CONFUSION_MATRIX = "confusion_matrix"
    SEMANTIC_SIMILARITY = "semantic_similarity"
    CUSTOM = "custom"


GenerateFunc = Callable[[str], str]
ScoreFunc = Callable[[str, str], tuple[float, int]]
# A custom metric: (predictions, references, examples) -> a number or a dict of numbers
CustomFunc = Callable[[Sequence[str], Sequence[str], Sequence[dict[str, Any]]], Any]


@dataclass
class EvaluationMetric:
    """One metric to compute. ``MetricType.CUSTOM`` uses ``compute_fn``, or, without one,
    the built-in metric of the same ``name`` (so ``EvaluationMetric("perplexity", MetricType.CUSTOM)``
    means perplexity)."""

    name: str
    metric_type: MetricType = MetricType.CUSTOM
    description: str = ""
    compute_fn: CustomFunc | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metric_type, str) and not isinstance(self.metric_type, MetricType):
            try:
                self.metric_type = MetricType(self.metric_type)
            except ValueError:
                raise ValueError(
                    f"metric {self.name!r}: unknown metric_type {self.metric_type!r}; "
                    f"use one of {', '.join(m.value for m in MetricType)}"
                ) from None
        if self.metric_type is MetricType.CUSTOM and self.compute_fn is None and self.name not in _BUILTIN:
            raise ValueError(
                f"metric {self.name!r} is CUSTOM but has no compute_fn and is not a built-in metric; "
                f"pass compute_fn=... or use one of {', '.join(sorted(_BUILTIN))}"
            )

    @property
    def builtin(self) -> str | None:
        """The built-in metric this resolves to (None for a custom function)."""
        if self.compute_fn is not None:
            return None
        return self.name if self.metric_type is MetricType.CUSTOM else self.metric_type.value


_BUILTIN = {m.value for m in MetricType if m is not MetricType.CUSTOM} | {"rouge1", "rouge2", "rougeL"}


@dataclass
class EvaluationReport:
    model_name: str
    n: int
    metrics: dict[str, Any]
    descriptions: dict[str, str] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)  # the first few predictions, for a look
    elapsed_s: float = 0.0

    def __getitem__(self, name: str) -> Any:
        return self.metrics[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "n": self.n,
            "metrics": self.metrics,
            "descriptions": self.descriptions,
            "samples": self.samples,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, default=_json_default)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def summary(self) -> str:
        lines = [f"{self.model_name}: {self.n} examples"]
        for name, value in self.metrics.items():
            if isinstance(value, float):
                lines.append(f"  {name:<20} {value:.4f}")
            elif not isinstance(value, dict):
                lines.append(f"  {name:<20} {value}")
        return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_PROMPT_KEYS = ("prompt", "question", "input")
_REFERENCE_KEYS = ("reference", "completion", "answer", "output", "label", "response")


def example_prompt_reference(example: dict[str, Any], index: int) -> tuple[str, str]:
    """(prompt, reference) of a dataset row; accepts the usual field names."""
    if not isinstance(example, dict):
        raise ValueError(
            f"dataset[{index}] is a {type(example).__name__}, expected an object with prompt/reference"
        )
    if "instruction" in example:
        parts = [str(example["instruction"]), str(example.get("input") or "")]
        prompt = "\n\n".join(p for p in parts if p)
    else:
        prompt = next((str(example[k]) for k in _PROMPT_KEYS if k in example), None)  # type: ignore[assignment]
    reference = next((str(example[k]) for k in _REFERENCE_KEYS if k in example and k != "input"), None)
    if prompt is None or reference is None:
        raise ValueError(
            f"dataset[{index}] has fields {sorted(example)}; it needs a prompt ({'/'.join(_PROMPT_KEYS)} or "
            f"instruction) and a reference ({'/'.join(k for k in _REFERENCE_KEYS if k != 'input')})"
        )
    return prompt, reference


def load_dataset_rows(dataset: str | Path | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A list of dicts, or a JSON array / JSONL file of them."""
    if isinstance(dataset, str | Path):
        path = Path(dataset)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation dataset {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return list(json.loads(text))
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{i}: not valid JSON ({exc.msg}); one JSON object per line"
                    ) from None
        return rows
    return list(dataset)


class ModelEvaluator:
    """Collects metrics, then scores a generator on a dataset."""

    def __init__(self, metrics: Iterable[EvaluationMetric | str] = (), semantic_model: str | None = None):
        self.metrics: list[EvaluationMetric] = []
        self.semantic_model = semantic_model
        for m in metrics:
            self.add_metric(m)

    def add_metric(self, metric: EvaluationMetric | str) -> ModelEvaluator:
        if isinstance(metric, str):
            metric = EvaluationMetric(metric, MetricType.CUSTOM)
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name!r} is added twice")
        self.metrics.append(metric)
        return self

    def evaluate_model(
        self,
        model_name: str,
        generate_func: GenerateFunc | None,
        dataset: str | Path | Iterable[dict[str, Any]],
        score_func: ScoreFunc | None = None,
        max_samples_in_report: int = 5,
    ) -> EvaluationReport:
        if not self.metrics:
            raise ValueError("no metrics: call add_metric(EvaluationMetric(...)) first")
        rows = load_dataset_rows(dataset)
        if not rows:
            raise ValueError("the evaluation dataset is empty")
        pairs = [example_prompt_reference(row, i) for i, row in enumerate(rows)]
        prompts = [p for p, _ in pairs]
        references = [r for _, r in pairs]
        start = time.monotonic()

        builtin = list(
            dict.fromkeys(m.builtin for m in self.metrics if m.builtin and m.builtin != "perplexity")
        )
        if "semantic_similarity" in builtin:  # before generating anything
            check_semantic_similarity(self.semantic_model)
        needs_text = any(m.builtin != "perplexity" for m in self.metrics)
        predictions: list[str] = []
        if needs_text:
            if generate_func is None:
                raise ValueError("these metrics compare generated text: pass generate_func")
            predictions = [str(generate_func(p)) for p in prompts]

        computed = (
            compute_text_metrics(builtin, predictions, references, self.semantic_model) if builtin else {}
        )
        results: dict[str, Any] = {}
        for m in self.metrics:
            if m.builtin == "rouge":  # expands to rouge1, rouge2, rougeL
                results.update({k: computed[k] for k in LOGGED_NAMES["rouge"]})
            elif m.builtin and m.builtin != "perplexity":
                results[m.name] = computed[m.builtin]  # under the metric's own name, like its description
            elif m.builtin == "perplexity":
                if score_func is None:
                    raise ValueError(
                        f"metric {m.name!r} (perplexity) needs token log-likelihoods: pass "
                        "score_func(prompt, reference) -> (sum_nll, n_tokens), e.g. ModelFinetuner.score"
                    )
                nll = n_tok = 0.0
                for p, r in pairs:
                    s, n = score_func(p, r)
                    nll += s
                    n_tok += n
                results[m.name] = perplexity(nll / n_tok) if n_tok else math.nan
            elif m.compute_fn is not None:
                results[m.name] = m.compute_fn(predictions, references, rows)
        samples = [
            {"prompt": p, "prediction": pred, "reference": r}
            for (p, r), pred in zip(
                pairs[:max_samples_in_report], predictions[:max_samples_in_report], strict=False
            )
        ]
        return EvaluationReport(
            model_name=model_name,
            n=len(rows),
            metrics=results,
            descriptions={m.name: m.description for m in self.metrics if m.description},
            samples=samples,
            elapsed_s=time.monotonic() - start,
        )

    # ------------------------------------------------------------------------- human evaluation

    def export_human_eval(
        self,
        systems: dict[str, SystemSpec],
        dataset: str | Path | Iterable[dict[str, Any]],
        output_dir: str | Path,
        **options: Any,
    ) -> ExportResult:
        """Write a blind rating sheet (sheet.csv, sheet.jsonl) and its key.json into ``output_dir``.

        ``systems`` maps a name to a model or adapter directory (local or s3://) or to a
        ``generate_func(prompt) -> str``. Options: see ``human.export_sheet`` (seed, rating,
        scale, max_prompts, max_new_tokens, batch_size, base_model, include_reference, ...).
        """
        from kubetune_trainer.evaluation.human import export_sheet

        data = dataset if isinstance(dataset, str | Path) else list(dataset)
        return export_sheet(systems, data, output_dir, **options)

    def import_human_eval(
        self,
        sheets: str | Path | Iterable[str | Path],
        key: str | Path,
        skip_unrated: bool = False,
    ) -> HumanEvalResult:
        """Read filled-in sheets (one per rater) with their key: mean scores and win rates with 95% intervals."""
        from kubetune_trainer.evaluation.human import import_ratings

        return import_ratings(sheets, key, skip_unrated=skip_unrated)
