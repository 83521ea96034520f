"""The OpenAI serving layer: what the HTTP routes do, without HTTP (as vLLM's ``OpenAIServing``).

:class:`OpenAIServing` owns model cards, request checks and limits, tokenisation (chat
templates included), turning a request into engine rows, the OpenAI response bodies and streams,
and the checks around adapter load/unload. :mod:`.app` only routes: it parses the body into the
request model, calls one method here and wraps the result in a response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from kubetune_trainer.data import chat_template_for

from .config import check_adapter_name
from .errors import NOT_FOUND, SERVER_ERROR, APIError
from .metrics import UNKNOWN_MODEL
from .protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest, Unsupported
from .rows import Failed, Finished, ModelNotLoadedError, Row, RowEvent, TextDelta, TokenLogprob
from .sources import SourceError, SourceNotFoundError, check_allowed_source
from .structured import GrammarError

if TYPE_CHECKING:
    from .backend import ServingBackend

log = logging.getLogger(__name__)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIServing:
    """The OpenAI endpoints' logic over one :class:`~.backend.ServingBackend` (a :class:`~.server.ModelServer`)."""

    def __init__(self, server: ServingBackend):
        self.server = server
        # load/unload requests run one at a time: each is short, and their order matters
        self._admin_lock = asyncio.Lock()

    # ---------------------------------------------------------------- models

    def cards(self) -> list[dict[str, Any]]:
        server = self.server
        with server.lock:
            out = []
            max_len = server.lm.max_model_len if server.lm is not None else None
            if server.base_name and server.lm is not None:
                out.append(_card(server.base_name, server.created, server.base_source, None, max_len))
            for name, s in sorted(server.adapters.items()):
                if s.loaded:
                    out.append(_card(name, server.created, s.source, server.base_name, max_len))
            return out

    def card(self, model_id: str) -> dict[str, Any]:
        for card in self.cards():
            if card["id"] == model_id:
                return card
        raise self.unknown_model(model_id)

    def unknown_model(self, name: str | None) -> APIError:
        available = ", ".join(self.server.model_names()) or "none (still loading)"
        if name is None:
            return APIError(
                400, f"no model given and no default model: set 'model' to one of: {available}", param="model"
            )
        return APIError(
            404,
            f"The model '{name}' does not exist. Available models: {available}",
            type=NOT_FOUND,
            param="model",
            code="model_not_found",
        )

    # ---------------------------------------------------------------- generation

    def count_refused(self, endpoint: str, exc: APIError, model: str = UNKNOWN_MODEL) -> None:
        """Count a generation request refused before it started (bad JSON, unknown model ...)."""
        self.server.metrics.requests.labels(model, endpoint, str(exc.status)).inc()

    async def generate(self, endpoint: str, req: Any) -> dict[str, Any] | AsyncIterator[str]:
        """A completion or chat request: the response body, or (``stream``) its SSE events."""
        label = [UNKNOWN_MODEL]  # until the model is known (unknown model, bad prompt ...)
        try:
            gen = await self.start(endpoint, req, label)
        except APIError as exc:
            self.count_refused(endpoint, exc, label[0])
            raise
        gen.submit()
        if req.stream:
            return _stream(gen, req, endpoint == CHAT)
        return await _complete(gen, endpoint == CHAT, req.top_logprobs_count is not None)

    def limits(
        self, gen: Generation, ids: list[int], max_tokens: int | None, default: int | None, index: int
    ) -> int:
        lm = self.server.lm
        limit = lm.max_model_len
        where = f"prompt {index}" if index else "the prompt"
        if not ids:
            raise APIError(400, f"{where} is empty: it encodes to no tokens", param="prompt")
        bad = next((t for t in ids if not 0 <= t < lm.vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"{where} has token id {bad}, outside the vocabulary (0..{lm.vocab_size - 1})",
                param="prompt",
            )
        room = limit - len(ids)
        if max_tokens is None:
            max_tokens = min(default, room) if default is not None else room
            if room < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens, and {where} already has "
                    f"{len(ids)} tokens: shorten it",
                    param="messages" if gen.endpoint == CHAT else "prompt",
                    code="context_length_exceeded",
                )
        elif len(ids) + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in {where}, {max_tokens} for the completion). "
                "Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    async def start(self, endpoint: str, req: Any, label: list[str]) -> Generation:
        """Check and tokenize a parsed request, and build its rows (not yet submitted).

        ``label[0]`` becomes the model's metrics label as soon as the model is known."""
        server = self.server
        try:
            req.check_supported()
        except Unsupported as exc:
            raise APIError(400, str(exc), param=exc.param, code="unsupported_parameter") from None
        target = server.resolve_model(req.model)
        if target is None:
            raise self.unknown_model(req.model)
        name = server.engine.label(target)  # the adapter name, or the base model's served name
        label[0] = name
        gen = Generation(server, endpoint, name, req.stream, req.n)
        tok = server.lm.tokenizer
        if endpoint == CHAT:
            messages = [{"role": m.role, "content": m.content} for m in req.messages]
            try:
                text = tok.apply_chat_template(
                    messages, chat_template=chat_template_for(tok), add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # jinja errors and templates' raise_exception(...)
                raise APIError(
                    400, f"the model's chat template rejected the messages: {exc}", param="messages"
                ) from None
            # The template writes BOS and role markers itself (as training rendered chats).
            prompts: list[list[int]] = [tok(text, add_special_tokens=False).input_ids]
            default = None
        else:
            prompts = [tok(p).input_ids if isinstance(p, str) else p for p in req.prompt]
            default = DEFAULT_COMPLETION_MAX_TOKENS
        grammar = None
        json_required, schema = req.json_format
        if json_required:
            try:
                grammar = await asyncio.to_thread(server.json_grammar, schema)
            except GrammarError as exc:
                raise APIError(400, str(exc), param="response_format.json_schema.schema") from None
        for i, ids in enumerate(prompts):
            max_tokens = self.limits(gen, ids, req.max_tokens, default, i)
            if req.min_tokens > max_tokens:
                raise APIError(
                    400,
                    f"min_tokens ({req.min_tokens}) must be at most max_tokens ({max_tokens}): lower min_tokens",
                    param="min_tokens",
                )
            for choice in range(req.n):
                gen.add_row(
                    prompt_ids=ids,
                    model=target,
                    max_tokens=max_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    # Each choice samples its own sequence; with a seed, choice j uses seed + j (reproducible).
                    seed=None if req.seed is None else req.seed + choice,
                    stop=req.stop,
                    ignore_eos=req.ignore_eos,
                    min_tokens=req.min_tokens,
                    logprobs=req.top_logprobs_count,
                    grammar=grammar,
                )
        return gen

    # ---------------------------------------------------------------- adapters (vLLM's endpoints)

    async def load_adapter(self, req: LoadLoraAdapterRequest) -> str:
        """vLLM's /v1/load_lora_adapter: checks, then the load; returns the success message."""
        server = self.server
        if not req.lora_name or not req.lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", type="InvalidUserInput")
        try:
            check_adapter_name(req.lora_name, field="lora_name")
        except ValueError as exc:
            raise APIError(400, str(exc), type="InvalidUserInput", param="lora_name") from None
        try:
            check_allowed_source(req.lora_path, server.adapter_roots())
        except PermissionError as exc:
            raise APIError(
                403, str(exc), type="permission_error", param="lora_path", code="path_not_allowed"
            ) from None
        except SourceError as exc:
            raise APIError(400, str(exc), type="BadRequestError", param="lora_path") from None
        async with self._admin_lock:
            state = server.adapters.get(req.lora_name)
            if state is not None and state.loaded and not req.load_inplace:
                raise APIError(
                    400,
                    f"The lora adapter '{req.lora_name}' has already been loaded.",
                    type="InvalidUserInput",
                    param="lora_name",
                )
            try:
                await asyncio.to_thread(
                    server.load_adapter, req.lora_name, req.lora_path, replace=req.load_inplace
                )
            except SourceNotFoundError as exc:
                raise APIError(404, str(exc), type=NOT_FOUND, param="lora_path") from None
            except (SourceError, ValueError) as exc:
                raise APIError(400, str(exc), type="BadRequestError", param="lora_path") from None
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload_adapter(self, req: UnloadLoraAdapterRequest) -> str:
        """vLLM's /v1/unload_lora_adapter; returns the success message."""
        if not req.lora_name:
            raise APIError(400, "'lora_name' must be provided.", type="InvalidUserInput", param="lora_name")
        async with self._admin_lock:
            try:
                await asyncio.to_thread(self.server.unload_adapter, req.lora_name)
            except KeyError:
                raise APIError(
                    404,
                    f"The lora adapter '{req.lora_name}' cannot be found.",
                    type=NOT_FOUND,
                    param="lora_name",
                ) from None
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."


class Generation:
    """One completion/chat request: its rows, their events, and the response it builds."""

    def __init__(self, server: ServingBackend, endpoint: str, model_name: str, stream: bool, n: int = 1):
        self.server = server
        self.n = n  # choices per prompt: rows i*n .. i*n+n-1 answer prompt i (choice index = row index)
        self.endpoint = endpoint
        self.model_name = model_name
        self.stream = stream
        self.id = ("chatcmpl-" if endpoint == CHAT else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self.rows: list[Row] = []
        self.queue: asyncio.Queue[tuple[int, RowEvent]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def add_row(self, **kwargs: Any) -> None:
        index = len(self.rows)

        def sink(event: RowEvent) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        self.rows.append(Row(sink=sink, **kwargs))

    def submit(self) -> None:
        for row in self.rows:
            self.server.engine.submit(row)

    def cancel(self) -> None:
        for row in self.rows:
            if not row.done:
                row.cancelled = True

    def note_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.server.metrics.ttft.labels(self.model_name).observe(self.first_token_at - self.start)

    def record(self, status: int, usage: dict[str, int] | None) -> None:
        m = self.server.metrics
        m.requests.labels(self.model_name, self.endpoint, str(status)).inc()
        m.latency.labels(self.model_name, self.endpoint).observe(time.monotonic() - self.start)
        if usage:
            m.prompt_tokens.labels(self.model_name).inc(usage["prompt_tokens"])
            m.completion_tokens.labels(self.model_name).inc(usage["completion_tokens"])


def _row_error(exc: BaseException, model: str) -> APIError:
    if isinstance(exc, ModelNotLoadedError):
        return APIError(
            404,
            f"The model '{model}' was unloaded while the request waited.",
            type=NOT_FOUND,
            code="model_not_found",
        )
    return APIError(500, f"generation failed: {exc}", type=SERVER_ERROR)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _card(
    name: str, created: int, root: str | None, parent: str | None, max_len: int | None
) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "kubetune",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
    }


def _prompt_tokens(gen: Generation, finished: dict[int, Finished]) -> int:
    """Each prompt counts once, however many choices (n) it has."""
    return sum(f.prompt_tokens for i, f in finished.items() if i % gen.n == 0)


def _logprobs(tok: Any, entries: list[TokenLogprob], chat: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's ``content`` list, or the completions' parallel arrays."""
    text = {tid: tok.decode([tid]) for e in entries for tid in (e[0], *(t for t, _ in e[2]))}
    if chat:
        return {
            "content": [
                {
                    "token": text[tid],
                    "logprob": lp,
                    "bytes": list(text[tid].encode()),
                    "top_logprobs": [
                        {"token": text[t], "logprob": v, "bytes": list(text[t].encode())} for t, v in top
                    ],
                }
                for tid, lp, top in entries
            ],
            "refusal": None,
        }
    offsets = []
    for tid, _, _ in entries:
        offsets.append(offset)
        offset += len(text[tid])
    return {
        "tokens": [text[tid] for tid, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{text[t]: v for t, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


async def _complete(gen: Generation, chat: bool, logprobs: bool) -> dict[str, Any]:
    texts: list[list[str]] = [[] for _ in gen.rows]
    entries: list[list[TokenLogprob]] = [[] for _ in gen.rows]
    finished: dict[int, Finished] = {}
    status, usage = 500, None
    try:
        while len(finished) < len(gen.rows):
            index, event = await gen.queue.get()
            if isinstance(event, TextDelta):
                gen.note_text()
                texts[index].append(event.text)
                entries[index].extend(event.logprobs)
            elif isinstance(event, Finished):
                finished[index] = event
            elif isinstance(event, Failed):
                err = _row_error(event.error, gen.model_name)
                status = err.status
                raise err
        usage = _usage(_prompt_tokens(gen, finished), sum(f.completion_tokens for f in finished.values()))
        tok = gen.server.lm.tokenizer
        choices: list[dict[str, Any]] = []
        for i in range(len(gen.rows)):
            choice: dict[str, Any] = {"index": i}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(texts[i])}
            else:
                choice["text"] = "".join(texts[i])
            choice["logprobs"] = _logprobs(tok, entries[i], chat) if logprobs else None
            choice["finish_reason"] = finished[i].reason
            choices.append(choice)
        status = 200
        return {
            "id": gen.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": gen.created,
            "model": gen.model_name,
            "choices": choices,
            "usage": usage,
        }
    finally:
        gen.cancel()
        gen.record(status, usage if status == 200 else None)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(gen: Generation, req: Any, chat: bool) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": gen.id, "object": obj, "created": gen.created, "model": gen.model_name}

    tok = gen.server.lm.tokenizer
    want_logprobs = req.top_logprobs_count is not None
    offsets = [0] * len(gen.rows)  # completions' text_offset continues across chunks

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False, lps: tuple = ()) -> str:
        logprobs = None
        if want_logprobs and lps:
            logprobs = _logprobs(tok, list(lps), chat, offsets[index])
            if not chat:
                offsets[index] += sum(len(t) for t in logprobs["tokens"])
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        body = {**head, "choices": [choice]}
        if req.include_usage:
            body["usage"] = None
        return _sse(body)

    status, prompt_tokens, completion_tokens = 200, 0, 0
    done = 0
    try:
        if chat:
            for index in range(len(gen.rows)):
                yield chunk(index, "", None, role=True)
        while done < len(gen.rows):
            index, event = await gen.queue.get()
            if isinstance(event, TextDelta):
                gen.note_text()
                yield chunk(index, event.text, None, lps=event.logprobs)
            elif isinstance(event, Finished):
                done += 1
                if index % gen.n == 0:  # each prompt counts once, whatever n
                    prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
                yield chunk(index, "" if not chat else None, event.reason)
            elif isinstance(event, Failed):
                err = _row_error(event.error, gen.model_name)
                status = err.status
                yield _sse(err.body())
                break
        if status == 200 and req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        # Also runs when the client disconnects: the engine drops the rest of its rows.
        gen.cancel()
        usage = _usage(prompt_tokens, completion_tokens) if status == 200 and done == len(gen.rows) else None
        gen.record(status if done == len(gen.rows) or status != 200 else 499, usage)
