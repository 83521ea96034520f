"""Data augmentation of the training split: synonym replacement, paraphrasing, back-translation.

The pipeline calls :func:`augment` after the validation split, so validation and test data are never
augmented. What is rewritten: the prompt side of an example (instruction and input, the completion's
prompt, user turns) and, with ``include_response``, its response too (output, completion, assistant
turns); text data is rewritten whole. Every variant is checked against the originals (training and
validation examples) and the other variants under the run's dedupe mode (``exact`` when dedupe is
``none``); duplicates, unchanged and empty variants are dropped and counted.

Deterministic for a seed: synonym choices come from a hash of the seed and the example, and the
models decode with beam search (no sampling). The guide's names are Python functions here too:
:func:`replace_synonyms`, :func:`paraphrase` and :func:`back_translate`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_trainer.config import AugmentationSettings
from kubetune_trainer.data.filters import Dedupe, dedupe_key
from kubetune_trainer.data.formats import Format, dedupe_texts, is_empty
from kubetune_trainer.data.split import split_score
from kubetune_trainer.data.synonyms import Synonyms, builtin_synonyms, load_synonyms
from kubetune_trainer.settings import (
    AUGMENT_DEFAULT_BATCH_SIZE,
    AUGMENT_DEFAULT_FRACTION,
    AUGMENT_DEFAULT_MAX_NEW_TOKENS,
    AUGMENT_PROMPT_DEFAULT,
)

if TYPE_CHECKING:
    from kubetune_trainer.config import BackTranslationAugmentation, ParaphraseAugmentation

log = logging.getLogger(__name__)

METHODS = ("replace_synonyms", "paraphrase", "back_translate")  # the names in stats, report and status
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letters, with an inner apostrophe (don't)


@dataclass
class AugmentCounts:
    generated: int = 0  # variants made
    kept: int = 0  # added to the training split
    dropped: int = 0  # duplicates (of an original or another variant), unchanged, empty or too long


@dataclass(frozen=True)
class Item:
    """An original training example: its dedupe identity and its fields (formats.validate's output)."""

    key: str
    format: Format
    fields: dict[str, Any]


@dataclass(frozen=True)
class Variant:
    index: int  # of the original in the items
    method: str
    fields: dict[str, Any]


# ---- which texts of an example are rewritten ------------------------------------------------------


def _paths(fields: dict[str, Any], fmt: Format, include_response: bool) -> list[tuple[Any, ...]]:
    if fmt == "text":
        paths: list[tuple[Any, ...]] = [("text",)]
    elif fmt == "instruction":
        paths = [("instruction",), ("input",), *([("output",)] if include_response else [])]
    elif fmt == "completion":
        paths = [("prompt",), *([("completion",)] if include_response else [])]
    else:
        roles = ("user", "assistant") if include_response else ("user",)
        paths = [("messages", i, "content") for i, m in enumerate(fields["messages"]) if m["role"] in roles]
    return [p for p in paths if _get(fields, p).strip()]


def _get(fields: dict[str, Any], path: tuple[Any, ...]) -> str:
    value: Any = fields
    for part in path:
        value = value[part]
    return value


def _with(fields: dict[str, Any], replacements: dict[tuple[Any, ...], str]) -> dict[str, Any]:
    out = {k: ([dict(m) for m in v] if k == "messages" else v) for k, v in fields.items()}
    for path, text in replacements.items():
        target: Any = out
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = text
    return out


# ---- synonym replacement --------------------------------------------------------------------------


def _synonym_source(synonyms: Synonyms | str | Path | None) -> Synonyms:
    if synonyms is None:
        return builtin_synonyms()
    if isinstance(synonyms, Synonyms):
        return synonyms
    return load_synonyms(synonyms)


def _replace_words(text: str, fraction: float, rng: random.Random, source: Synonyms) -> str:
    words = [m for m in _WORD.finditer(text) if source.lookup(m.group())]
    if not words:
        return text
    chosen = sorted(rng.sample(words, max(1, round(fraction * len(words)))), key=lambda m: m.start())
    out, pos = [], 0
    for m in chosen:
        word = m.group()
        new = rng.choice(source.lookup(word))
        if word.isupper() and len(word) > 1:
            new = new.upper()
        elif word[0].isupper():
            new = new[0].upper() + new[1:]
        out += [text[pos : m.start()], new]
        pos = m.end()
    return "".join(out) + text[pos:]


def replace_synonyms(
    text: str,
    fraction: float = AUGMENT_DEFAULT_FRACTION,
    *,
    seed: int = 42,
    synonyms: Synonyms | str | Path | None = None,
) -> str:
    """``text`` with ``fraction`` of its replaceable words swapped for a synonym (at least one).

    ``synonyms``: a synonyms file (JSON ``{word: [synonyms]}`` or ``word,synonym,...`` lines); the
    default is the built-in Moby thesaurus (offline). The same text and seed give the same result.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return _replace_words(text, fraction, random.Random(f"{seed}:{text}"), _synonym_source(synonyms))


def _synonym_variants(
    items: Sequence[Item], fraction: float, variants: int, include_response: bool, seed: int, source: Synonyms
) -> list[Variant]:
    out = []
    for index, item in enumerate(items):
        paths = _paths(item.fields, item.format, include_response)
        for v in range(variants):
            rng = random.Random(f"{seed}:synonyms:{item.key}:{v}")
            new = {p: _replace_words(_get(item.fields, p), fraction, rng, source) for p in paths}
            out.append(Variant(index, "replace_synonyms", _with(item.fields, new)))
    return out


# ---- model rewriting (paraphrase, back-translation) -----------------------------------------------


class Rewriter:
    """A seq2seq or causal model that rewrites texts in batches (transformers ``generate``, beam search)."""

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = AUGMENT_DEFAULT_BATCH_SIZE,
        max_new_tokens: int = AUGMENT_DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.name = model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.seq2seq = bool(getattr(AutoConfig.from_pretrained(model), "is_encoder_decoder", False))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if not self.seq2seq:
            self.tokenizer.padding_side = "left"  # generation continues after the prompt's last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.model = auto.from_pretrained(model).to(self.device).eval()
        self.batches = 0  # generate() calls so far

    def rewrite(
        self, texts: Sequence[str], prompt: str = AUGMENT_PROMPT_DEFAULT, variants: int = 1
    ) -> list[list[str]]:
        """``variants`` rewrites of each text (the best beams, best first)."""
        import torch
        from tqdm.auto import tqdm

        out: list[list[str]] = []
        limit = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1_000_000 else None
        with tqdm(
            total=len(texts), desc=f"rewriting with {Path(self.name).name}", unit="text", disable=None
        ) as bar:
            for start in range(0, len(texts), self.batch_size):
                chunk = [prompt.replace("{text}", t) for t in texts[start : start + self.batch_size]]
                enc = self.tokenizer(
                    chunk, return_tensors="pt", padding=True, truncation=limit is not None, max_length=limit
                ).to(self.device)
                with torch.inference_mode():
                    ids = self.model.generate(
                        **enc,
                        max_new_tokens=self.max_new_tokens,
                        num_beams=variants,
                        num_return_sequences=variants,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                self.batches += 1
                if not self.seq2seq:
                    ids = ids[:, enc["input_ids"].shape[1] :]
                decoded = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
                out += [decoded[i : i + variants] for i in range(0, len(decoded), variants)]
                bar.update(len(chunk))
        return out


def _as_list(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    return ([texts], True) if isinstance(texts, str) else (list(texts), False)


def _resolve(model: str) -> str:
    from kubetune_trainer.distributed import dist_info
    from kubetune_trainer.models import resolve_model_path

    return resolve_model_path(model, dist_info())


def paraphrase(
    texts: str | Sequence[str],
    model: str,
    *,
    variants: int = 1,
    prompt: str = AUGMENT_PROMPT_DEFAULT,
    batch_size: int = AUGMENT_DEFAULT_BATCH_SIZE,
    max_new_tokens: int = AUGMENT_DEFAULT_MAX_NEW_TOKENS,
) -> Any:
    """Paraphrases by ``model`` (a directory, s3:// or a hub id; seq2seq or causal).

    A string gives a string (variants=1) or a list of variants; a list of texts gives one result per text.
    """
    items, single = _as_list(texts)
    rewriter = Rewriter(_resolve(model), batch_size=batch_size, max_new_tokens=max_new_tokens)
    result = rewriter.rewrite(items, prompt, variants)
    flat = [r[0] if variants == 1 else r for r in result]
    return flat[0] if single else flat


def back_translate(
    texts: str | Sequence[str],
    model: str,
    back_model: str,
    *,
    variants: int = 1,
    prompt: str = AUGMENT_PROMPT_DEFAULT,
    back_prompt: str = AUGMENT_PROMPT_DEFAULT,
    batch_size: int = AUGMENT_DEFAULT_BATCH_SIZE,
    max_new_tokens: int = AUGMENT_DEFAULT_MAX_NEW_TOKENS,
) -> Any:
    """Texts translated by ``model`` into a pivot language and back by ``back_model``."""
    items, single = _as_list(texts)
    there = Rewriter(_resolve(model), batch_size=batch_size, max_new_tokens=max_new_tokens)
    back = Rewriter(_resolve(back_model), batch_size=batch_size, max_new_tokens=max_new_tokens)
    result = _round_trip(there, back, items, prompt, back_prompt, variants)
    flat = [r[0] if variants == 1 else r for r in result]
    return flat[0] if single else flat


def _round_trip(
    there: Rewriter, back: Rewriter, texts: list[str], prompt: str, back_prompt: str, variants: int
) -> list[list[str]]:
    pivots = there.rewrite(texts, prompt, variants)
    returned = back.rewrite([p for ps in pivots for p in ps], back_prompt, 1)
    return [[r[0] for r in returned[i * variants : (i + 1) * variants]] for i in range(len(texts))]


def _capped(items: Sequence[Item], variants: int, cap: int | None, method: str, seed: int) -> list[int]:
    """The items a model method rewrites: all, or (with a cap) a seeded choice of enough of them."""
    indices = list(range(len(items)))
    if cap is None or cap >= len(items) * variants:
        return indices
    ranked = sorted(indices, key=lambda i: (split_score(seed, f"{method}:{items[i].key}"), i))
    return sorted(ranked[: math.ceil(cap / variants)])


def _model_variants(
    items: Sequence[Item],
    method: str,
    settings: ParaphraseAugmentation | BackTranslationAugmentation,
    seed: int,
    rewrite: Callable[[list[str]], list[list[str]]],
) -> list[Variant]:
    chosen = _capped(items, settings.variants, settings.max_variants, method, seed)
    paths = {i: _paths(items[i].fields, items[i].format, settings.include_response) for i in chosen}
    # The same text (an instruction shared by many examples) is rewritten once.
    unique = list(dict.fromkeys(_get(items[i].fields, p) for i in chosen for p in paths[i]))
    log.info(
        "augmentation: %s of %d texts from %d of %d examples (%d variants each)",
        method, len(unique), len(chosen), len(items), settings.variants,
    )  # fmt: skip
    rewrites = dict(zip(unique, rewrite(unique), strict=True)) if unique else {}
    out = []
    for i in chosen:
        for v in range(settings.variants):
            new = {p: rewrites[_get(items[i].fields, p)][v] for p in paths[i]}
            out.append(Variant(i, method, _with(items[i].fields, new)))
    return out[: settings.max_variants] if settings.max_variants is not None else out


def _free_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")  # only when a model was loaded
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the pipeline's entry point -------------------------------------------------------------------


def augment(
    items: Sequence[Item],
    settings: AugmentationSettings,
    *,
    seed: int,
    dedupe: Dedupe,
    seen_keys: set[str],
    rewriter: Callable[..., Rewriter] = Rewriter,
) -> tuple[list[Variant], dict[str, AugmentCounts]]:
    """New training examples for ``items``, deduplicated, with counts per method.

    ``seen_keys`` holds the dedupe keys (``dedupe_key(parts, mode, fmt)`` under ``dedupe``) of the
    data a variant must not repeat; the kept variants' keys are added to it.
    """
    mode: Dedupe = "exact" if dedupe == "none" else dedupe
    counts: dict[str, AugmentCounts] = {}
    candidates: list[Variant] = []
    for method, configured in zip(
        METHODS, (settings.synonyms, settings.paraphrase, settings.back_translation), strict=True
    ):
        if configured is not None:
            counts[method] = AugmentCounts()
    if settings.synonyms is not None:
        s = settings.synonyms
        source = _synonym_source(s.synonyms_file)
        log.info(
            "augmentation: replacing %.0f%% of the words with synonyms from %s", s.fraction * 100, source.name
        )
        candidates += _synonym_variants(items, s.fraction, s.variants, s.include_response, seed, source)
    if settings.paraphrase is not None:
        p = settings.paraphrase
        model = rewriter(p.model, batch_size=p.batch_size, max_new_tokens=p.max_new_tokens)
        candidates += _model_variants(
            items, "paraphrase", p, seed, lambda texts: model.rewrite(texts, p.prompt, p.variants)
        )
        del model
    if settings.back_translation is not None:
        b = settings.back_translation
        there = rewriter(b.model, batch_size=b.batch_size, max_new_tokens=b.max_new_tokens)
        back = rewriter(b.back_model, batch_size=b.batch_size, max_new_tokens=b.max_new_tokens)
        candidates += _model_variants(
            items,
            "back_translate",
            b,
            seed,
            lambda texts: _round_trip(there, back, texts, b.prompt, b.back_prompt, b.variants),
        )
        del there, back

    _free_accelerator_memory()  # the models are deleted; training needs their memory
    kept = []
    for variant in candidates:
        c = counts[variant.method]
        c.generated += 1
        fmt = items[variant.index].format
        key = dedupe_key(dedupe_texts(variant.fields, fmt), mode, fmt)
        if key in seen_keys or is_empty(variant.fields, fmt):
            c.dropped += 1
            continue
        seen_keys.add(key)
        c.kept += 1
        kept.append(variant)
    return kept, counts
