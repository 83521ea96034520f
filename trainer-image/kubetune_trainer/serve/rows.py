"""One sequence to generate (a *row* of a batch) and the events it reports back (torch-free).

The HTTP layer creates rows; the engine's worker thread generates them and calls each row's
``sink`` with :class:`TextDelta`, then exactly one :class:`Finished` or :class:`Failed`. Sinks run
on the worker thread: they must be quick and thread-safe (the HTTP layer's sink hands the event
to its event loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# One generated token's log-probability: (token id, logprob, ((top id, top logprob), ...)).
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind this text, when the row asked for them


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated tokens (without EOS)


@dataclass(frozen=True)
class Failed:
    error: BaseException


RowEvent = TextDelta | Finished | Failed


class ModelNotLoadedError(LookupError):
    """The row's adapter was unloaded after the request was accepted."""


@dataclass(eq=False)
class Row:
    """A prompt (token ids), the model to run it with, and its sampling parameters."""

    prompt_ids: list[int]
    model: str  # an adapter name, or config.BASE_ROW for the base model
    max_tokens: int
    sink: Callable[[RowEvent], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating after EOS until max_tokens (benchmarks; vLLM has it too)
    min_tokens: int = 0  # EOS masked and stop strings not matched before this many tokens (vLLM's meaning)
    logprobs: int | None = None  # report each token's logprob and this many top alternatives (None: off)
    grammar: Any = None  # an xgrammar CompiledGrammar the text must follow (response_format), or None
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the HTTP layer when the client goes away
    emitted: bool = False  # the row has sent an event (a failed batch must not retry it)
    done: bool = False  # Finished or Failed was sent

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def send(self, event: RowEvent) -> None:
        """Deliver one event; a sink that raises cancels its row and never disturbs the batch."""
        if self.done:
            return
        self.emitted = True
        if isinstance(event, Finished | Failed):
            self.done = True
        try:
            self.sink(event)
        except Exception:  # a broken consumer (e.g. closed event loop) only loses its own row
            self.cancelled = True
