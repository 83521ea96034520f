"""``response_format`` json_object / json_schema: grammar-constrained decoding with xgrammar.

A request's schema is compiled once (off the event loop) into an xgrammar ``CompiledGrammar``
that travels with its rows; at each step :class:`~.decoding.RowSampler` asks the row's matcher
which tokens keep the text a valid prefix of the grammar and masks the others, so greedy and
sampled rows alike can only produce JSON that parses (and matches the schema). When the JSON is
complete the grammar admits only EOS, so the row stops there. Rows without a grammar are not
touched: their tokens stay exactly those of plain ``generate()``.
"""

from __future__ import annotations

import json
import threading
from typing import Any


class GrammarError(ValueError):
    """The schema cannot be compiled; the message says why."""


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer (cached by schema)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._lock = threading.Lock()

    def compile(self, schema: dict[str, Any] | None) -> Any:
        """``None``: any JSON object (json_object); else a JSON schema (json_schema)."""
        with self._lock:
            try:
                if schema is None:
                    return self._compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
                return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its reason
                raise GrammarError(f"response_format.json_schema.schema cannot be used: {exc}") from None


class RowGrammar:
    """One row's matcher: masks the scores before a token is chosen, then accepts that token."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, scores: Any) -> None:
        """Set the scores of tokens the grammar forbids to -inf (``scores``: one row, 1 x V)."""
        import torch

        if self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        width = min(scores.shape[-1], self.vocab_size)
        view = scores[:, :width]
        if view.dtype == torch.float32 and view.is_contiguous():
            self._xgr.apply_token_bitmask_inplace(view, self.bitmask.to(view.device), vocab_size=width)
        else:
            tmp = view.float().contiguous()
            self._xgr.apply_token_bitmask_inplace(tmp, self.bitmask.to(tmp.device), vocab_size=width)
            view.copy_(tmp)
        if scores.shape[-1] > width:  # padding rows of the output layer are never valid
            scores[:, width:] = float("-inf")

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)
