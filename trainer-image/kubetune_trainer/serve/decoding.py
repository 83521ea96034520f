"""Generating one batch of rows with ``model.generate()``: per-row sampling, stops and streaming.

transformers' ``generate()`` runs the decoding loop; three small plug-ins make one call serve
requests with different parameters:

* :class:`RowSampler` (a ``LogitsProcessor``): rows with temperature > 0 are sampled here, each
  with its own temperature, top-p and ``torch.Generator`` (seeded from the request's ``seed``),
  and the chosen token is left as the only finite score. ``generate()`` itself runs greedy, so
  greedy rows keep their raw argmax. A row's tokens therefore depend only on its own logits and
  its own generator, never on which other requests share the batch.
* :class:`BatchTracker` as a ``StoppingCriteria``: after each step it detokenizes each row's new
  token incrementally, applies EOS, stop strings and the row's own ``max_tokens``, and tells
  ``generate()`` which rows are done (a finished row gets pad tokens from then on).
* :class:`BatchTracker` as a ``BaseStreamer``: ``put()`` hands the text produced so far to each
  row's sink, so streaming clients see tokens as they are generated, and a row that stops early
  gets its final event at once instead of when the whole batch ends.

The text decided in the stopping check is only delivered in ``put()``/``end()``, so the result
does not depend on the order in which ``generate()`` calls the two.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .rows import Finished, Row, TextDelta, TokenLogprob

# Prompt tokens decoded in front of the first generated token, so tokenizers that drop a leading
# space at the start of a text (SentencePiece) still produce it in the middle of one.
_CONTEXT_TOKENS = 6


class RowText:
    """Incremental detokenization of one row, with EOS, stop strings and max_tokens."""

    def __init__(self, row: Row, tokenizer: Any, eos_ids: frozenset[int]):
        self.row = row
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = list(row.prompt_ids[-_CONTEXT_TOKENS:])
        self.context = len(self.ids)
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already counted
        self.read_offset = len(self.ids)
        self.generated = 0
        self.text = ""  # everything decoded so far (complete characters)
        self.sent = 0  # characters of text already delivered
        self.finish_reason: str | None = None
        self.final_sent = False
        self.step_logprobs: list[TokenLogprob] = []  # one per generation step (RowSampler), EOS included
        self.logprobs: list[TokenLogprob] = []  # one per token of the completion
        self.logprobs_sent = 0
        self.max_stop = max((len(s) for s in row.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _read_new_text(self, final: bool) -> None:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        # A trailing U+FFFD is an incomplete UTF-8 sequence split across tokens: wait for the rest.
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def add(self, token: int) -> None:
        if self.finished:
            return
        if self.row.cancelled:
            self.finish_reason = "cancelled"
            return
        self.generated += 1
        if token in self.eos_ids and not self.row.ignore_eos:
            self._read_new_text(final=True)
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        if len(self.step_logprobs) >= self.generated:
            self.logprobs.append(self.step_logprobs[self.generated - 1])
        before = len(self.text)
        self._read_new_text(final=False)
        if self.max_stop and len(self.text) > before:
            # A match must end in the new text; it may start up to max_stop-1 characters earlier.
            start = max(0, before - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.row.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"
                return
        if self.generated >= self.row.max_tokens:
            self._read_new_text(final=True)
            self.finish_reason = "length"

    def deliverable(self) -> str:
        """Text that can be sent now: held back while it might still become a stop string."""
        end = len(self.text)
        if not self.finished and self.max_stop:
            for k in range(min(self.max_stop - 1, end - self.sent), 0, -1):
                tail = self.text[end - k :]
                if any(s.startswith(tail) for s in self.row.stop):
                    end -= k
                    break
        chunk = self.text[self.sent : end]
        self.sent = end
        return chunk


class BatchTracker(StoppingCriteria, BaseStreamer):
    """Per-row stopping decisions and text delivery for one ``generate()`` call."""

    def __init__(self, rows: Sequence[Row], tokenizer: Any, eos_ids: frozenset[int], prompt_width: int):
        self.rows = list(rows)
        self.texts = [RowText(r, tokenizer, eos_ids) for r in rows]
        self.prompt_width = prompt_width
        self.seen = 0  # generated positions already processed

    def finished(self, i: int) -> bool:
        return self.texts[i].finished

    # StoppingCriteria: called with all ids so far after each decoding step.
    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width + self.seen :].tolist()
        for step in range(len(new[0]) if new else 0):
            for i, row_text in enumerate(self.texts):
                row_text.add(new[i][step])
        self.seen += len(new[0]) if new else 0
        done = torch.tensor([t.finished for t in self.texts], dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]  # transformers annotates BoolTensor, returns bool tensors

    # BaseStreamer: the first call carries the prompt, later ones the new tokens.
    def put(self, value: Any) -> None:
        self.flush()

    def end(self) -> None:
        self.flush()

    def flush(self) -> None:
        for t in self.texts:
            if t.final_sent:
                continue
            chunk = t.deliverable()
            logprobs = tuple(t.logprobs[t.logprobs_sent :]) if chunk or t.finished else ()
            if chunk or logprobs:
                t.row.send(TextDelta(chunk, logprobs))
                t.logprobs_sent += len(logprobs)
            if t.finished:
                self._finish(t)

    def finish_all(self) -> None:
        """After ``generate()`` returns: rows it stopped (its own max length) end with "length"."""
        for t in self.texts:
            if not t.finished:
                t._read_new_text(final=True)
                t.finish_reason = "length"
        self.flush()

    def _finish(self, t: RowText) -> None:
        t.final_sent = True
        if t.finish_reason != "cancelled":
            t.row.send(
                Finished(
                    t.finish_reason or "stop",
                    len(t.row.prompt_ids),
                    t.generated,
                    tuple(t.ids[t.context :]),
                )
            )


class RowSampler(LogitsProcessor):
    """Samples the rows that ask for it (temperature > 0), each with its own generator.

    It also records the log-probabilities of the rows that asked for them: log-softmax of the
    model's raw logits (before temperature and top-p, as vLLM reports them by default), read
    before sampling, for the token chosen after it. Reading them changes no row's tokens.
    """

    def __init__(self, rows: Sequence[Row], tracker: BatchTracker):
        self.tracker = tracker
        self.rows = [(i, r) for i, r in enumerate(rows) if not r.greedy]
        self.logged = [(i, r.logprobs) for i, r in enumerate(rows) if r.logprobs is not None]
        self.constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        self.grammars: dict[int, Any] = {}
        self.warpers = {
            i: [TemperatureLogitsWarper(r.temperature)]
            + ([TopPLogitsWarper(r.top_p)] if r.top_p < 1.0 else [])
            for i, r in self.rows
        }
        self.generators: dict[int, torch.Generator] = {}

    def _generator(self, i: int, row: Row, device: torch.device) -> torch.Generator:
        gen = self.generators.get(i)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
            self.generators[i] = gen
        return gen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = {
            i: torch.log_softmax(scores[i].float(), dim=-1)
            for i, _ in self.logged
            if not self.tracker.finished(i)
        }
        live = [(i, self._grammar(i, g, scores)) for i, g in self.constrained if not self.tracker.finished(i)]
        for i, grammar in live:
            grammar.mask(scores[i : i + 1])  # before sampling: greedy and sampled rows alike
        self._sample(input_ids, scores)
        for i, grammar in live:
            grammar.accept(int(scores[i].argmax()))
        for i, top in self.logged:
            if i not in raw:
                continue
            logprobs = raw[i]
            # Greedy rows: generate() takes this argmax; sampled rows: the only finite score left.
            chosen = int(scores[i].argmax())
            alternatives: tuple[tuple[int, float], ...] = ()
            if top:
                values, ids = logprobs.topk(top)
                alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            self.tracker.texts[i].step_logprobs.append((chosen, float(logprobs[chosen]), alternatives))
        return scores

    def _grammar(self, i: int, compiled: Any, scores: torch.Tensor) -> Any:
        if i not in self.grammars:
            from .structured import RowGrammar

            self.grammars[i] = RowGrammar(compiled, scores.shape[-1])
        return self.grammars[i]

    def _sample(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> None:
        for i, row in self.rows:
            if self.tracker.finished(i):
                continue
            logits = scores[i : i + 1]
            for warper in self.warpers[i]:
                logits = warper(input_ids[i : i + 1], logits)
            probs = torch.softmax(logits.float(), dim=-1)
            token = torch.multinomial(probs, 1, generator=self._generator(i, row, scores.device))
            scores[i] = float("-inf")
            scores[i, token] = 0.0


def generate_rows(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    device: torch.device,
    eos_ids: frozenset[int],
    pad_id: int,
    adapter_names: list[str] | None = None,
) -> None:
    """Generate all ``rows`` in one ``generate()`` call; events go to each row's sink."""
    # Left padding: every row's last prompt token sits in the last column, where generation starts.
    batch = tokenizer.pad(
        {"input_ids": [r.prompt_ids for r in rows]}, padding_side="left", return_tensors="pt"
    ).to(device)
    width = batch["input_ids"].shape[1]
    tracker = BatchTracker(rows, tokenizer, eos_ids, width)
    config = GenerationConfig(
        max_new_tokens=max(r.max_tokens for r in rows),
        do_sample=False,  # RowSampler samples the rows that want it
        # BatchTracker applies EOS per row (a row may ignore it); an empty list turns generate()'s
        # own EOS check off, where None would bring back the model's default.
        eos_token_id=[],
        pad_token_id=pad_id,
    )
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    with torch.inference_mode():
        model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=config,
            logits_processor=LogitsProcessorList([RowSampler(rows, tracker)]),
            stopping_criteria=StoppingCriteriaList([tracker]),
            streamer=tracker,
            **kwargs,
        )
    tracker.finish_all()
