"""Per-row decoding: choosing tokens, detokenizing, stops and delivery; static batches too.

Two pieces serve every scheduling:

* :class:`RowText`: one row's incremental detokenization; it applies EOS, stop strings and the
  row's own ``max_tokens``, and ``deliver()`` hands the row's sink the text it may send (text
  that may still become a stop string is held back) and, once the row ends, its end.
* :class:`RowChooser`: the token choice of a row that samples (its own temperature, top-p and
  ``torch.Generator``, seeded from the request's ``seed``), reports log-probs, follows a
  grammar or may not end before ``min_tokens`` (EOS masked). A row's tokens depend only on its own logits and generator, never on which other
  requests share the batch. Plain greedy rows need none: they take the argmax.

Continuous batching (:mod:`.continuous`) calls them directly after each step. The static
baselines run one ``generate()`` call per batch (:func:`generate_rows`) with three plug-ins:

* :class:`RowSampler` (a ``LogitsProcessor``) asks each row's chooser and leaves the chosen
  token as the only finite score; ``generate()`` itself runs greedy and takes it.
* :class:`BatchTracker` as a ``StoppingCriteria``: after each step it feeds each row's new
  token to its :class:`RowText` and tells ``generate()`` which rows are done.
* :class:`BatchTracker` as a ``BaseStreamer``: ``put()`` delivers each row's text, so a row that
  stops early gets its final event at once instead of when the whole batch ends.

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
        early = self.generated <= self.row.min_tokens  # min_tokens: EOS was masked, stop strings wait
        if token in self.eos_ids and not self.row.ignore_eos and not early:
            self._read_new_text(final=True)
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        if len(self.step_logprobs) >= self.generated:
            self.logprobs.append(self.step_logprobs[self.generated - 1])
        before = len(self.text)
        self._read_new_text(final=False)
        if self.max_stop and len(self.text) > before and not early:
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

    def deliver(self) -> None:
        """Send the row the text (and logprobs) it may have now, and its end once finished."""
        if self.final_sent:
            return
        chunk = self.deliverable()
        logprobs = tuple(self.logprobs[self.logprobs_sent :]) if chunk or self.finished else ()
        if chunk or logprobs:
            self.row.send(TextDelta(chunk, logprobs))
            self.logprobs_sent += len(logprobs)
        if self.finished:
            self.final_sent = True
            if self.finish_reason != "cancelled":
                self.row.send(
                    Finished(
                        self.finish_reason or "stop",
                        len(self.row.prompt_ids),
                        self.generated,
                        tuple(self.ids[self.context :]),
                    )
                )

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
            t.deliver()

    def finish_all(self) -> None:
        """After ``generate()`` returns: rows it stopped (its own max length) end with "length"."""
        for t in self.texts:
            if not t.finished:
                t._read_new_text(final=True)
                t.finish_reason = "length"
        self.flush()


class RowChooser:
    """Chooses one row's tokens when the plain argmax will not do (torch).

    Rows that sample (temperature > 0), report log-probabilities, follow a grammar or have
    ``min_tokens`` get one each; plain greedy rows take the batch's vectorised argmax and never come here. Log-probs are
    log-softmax of the model's raw logits (before grammar, temperature and top-p, as vLLM reports
    them by default), read before choosing, for the token chosen after it. A sampled row draws
    from its own ``torch.Generator`` (seeded from the request's ``seed``), so its tokens depend
    only on its own logits, never on which other requests share the batch.
    """

    def __init__(self, text: RowText):
        self.text = text
        row = text.row
        self.row = row
        self.warpers: list[Any] = []
        if not row.greedy:
            self.warpers.append(TemperatureLogitsWarper(row.temperature))
            if row.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(row.top_p))
        self.generator: torch.Generator | None = None
        self.grammar: Any = None

    @staticmethod
    def needed(row: Row) -> bool:
        return not row.greedy or row.logprobs is not None or row.grammar is not None or row.min_tokens > 0

    def choose(self, scores: torch.Tensor) -> int:
        """The next token from this row's scores (1 x V); a grammar masks ``scores`` in place."""
        row = self.row
        raw = torch.log_softmax(scores[0].float(), dim=-1) if row.logprobs is not None else None
        if self.text.generated < row.min_tokens and not row.ignore_eos and self.text.eos_ids:
            scores = scores.clone()  # the model's logits may be an inference tensor: no in-place writes
            scores[0, list(self.text.eos_ids)] = float("-inf")  # min_tokens: EOS cannot be chosen yet
        if row.grammar is not None:
            if self.grammar is None:
                from .structured import RowGrammar

                self.grammar = RowGrammar(row.grammar, scores.shape[-1])
            self.grammar.mask(scores)  # before choosing: greedy and sampled rows alike
        if row.greedy:
            token = int(scores[0].argmax())
        else:
            logits = scores
            for warper in self.warpers:
                logits = warper(None, logits)
            probs = torch.softmax(logits.float(), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self._generator(scores.device)))
        if self.grammar is not None:
            self.grammar.accept(token)
        if raw is not None:
            alternatives: tuple[tuple[int, float], ...] = ()
            if row.logprobs:
                values, ids = raw.topk(row.logprobs)
                alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            self.text.step_logprobs.append((token, float(raw[token]), alternatives))
        return token

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            seed = self.row.seed if self.row.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(seed)
        return self.generator


class RowSampler(LogitsProcessor):
    """``generate()``'s hook into :class:`RowChooser` (static batches): the chosen token is left
    as the row's only finite score, so ``generate()``'s own greedy pick takes it."""

    def __init__(self, tracker: BatchTracker):
        self.tracker = tracker
        self.choosers = [(i, RowChooser(t)) for i, t in enumerate(tracker.texts) if RowChooser.needed(t.row)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, chooser in self.choosers:
            if self.tracker.finished(i):
                continue
            token = chooser.choose(scores[i : i + 1])
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


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
            logits_processor=LogitsProcessorList([RowSampler(tracker)]),
            stopping_criteria=StoppingCriteriaList([tracker]),
            streamer=tracker,
            **kwargs,
        )
    tracker.finish_all()
