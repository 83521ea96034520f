"""Request bodies of the OpenAI (and vLLM adapter) endpoints, validated with pydantic.

Types are strict (a number where a string belongs is an error, not coerced), fields clients
commonly send that the server does not act on (``user``) are ignored, and parameters the server
does not implement are rejected when set to anything but their neutral value, so a request
never silently gets a different behaviour than it asked for.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_N = 16  # choices per prompt: each is a row of the batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs (vLLM's default too)


class Unsupported(ValueError):
    """A parameter the server does not implement was set; ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = Field(None, description="adapter name or base model name; default: see set_adapter")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Any = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens tokens even after EOS")
    min_tokens: int = Field(
        0, ge=0, description="vLLM extension: no EOS and no stop string before this many tokens"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or an array of strings")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty strings")
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(items)}")
        return tuple(items)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not isinstance(value.get("include_usage", False), bool):
            raise ValueError("include_usage must be a boolean")
        return value

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives to report per token; None when logprobs are off."""
        return None

    @property
    def json_format(self) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def check_supported(self) -> None:
        """Reject parameters the server cannot honour (400 naming the parameter)."""
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise Unsupported(param, f"{param} is not supported by this server: leave it at 0")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options is only allowed with stream=true")


class CompletionRequest(_Request):
    prompt: Any = Field(..., description="a string, an array of strings, or token ids")
    echo: bool = False
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="report each token's logprob and this many top ones"
    )
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        msg = "must be a string, an array of strings, an array of token ids, or an array of such arrays"
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError(msg if not isinstance(value, list) else "must not be an empty array")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [list(value)]
        out: list[str | list[int]] = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif (
                isinstance(item, list)
                and item
                and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            ):
                out.append(list(item))
            else:
                raise ValueError(msg)
        return out

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "echo is not supported by this server")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", f"best_of={self.best_of} is not supported (only 1)")
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported by this server")

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: Any = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for part in value:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts are supported, got {kind!r}")
                parts.append(part["text"])
            return "".join(parts)
        raise ValueError("must be a string or an array of text content parts")


CHAT_ROLES = ("system", "user", "assistant")


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> ChatCompletionRequest:
        # max_completion_tokens is the newer name of max_tokens in OpenAI's chat API.
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def json_format(self) -> tuple[bool, dict[str, Any] | None]:
        """(JSON required, its schema or None for any object), from response_format."""
        kind = (self.response_format or {}).get("type")
        if kind == "json_schema":
            return True, (self.response_format or {})["json_schema"]["schema"]
        return kind == "json_object", None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise Unsupported("tools", "tool calling is not supported by this server")
        kind = (self.response_format or {}).get("type")
        if kind not in (None, "text", "json_object", "json_schema"):
            raise Unsupported(
                "response_format",
                f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
            )
        if kind == "json_schema":
            spec = (self.response_format or {}).get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise Unsupported(
                    "response_format.json_schema.schema",
                    "response_format type json_schema needs json_schema.schema: a JSON schema object, "
                    'e.g. {"type": "object", "properties": {...}}',
                )
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for system
            if role not in CHAT_ROLES:
                raise Unsupported(
                    f"messages[{i}].role",
                    f"messages[{i}].role {m.role!r} is not supported: use system, user or assistant",
                )
            m.role = role


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    lora_name: str = ""
    lora_int_id: int | None = None
