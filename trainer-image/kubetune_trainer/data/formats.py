"""Data formats: detection, validation and the prompt templates.

Four formats, told apart by the keys of the first record (docs/data.md):

- text:        {"text": "..."}                                         loss on every token
- instruction: {"instruction": "...", "input": "..."?, "output": "..."} loss on the output only
- chat:        {"messages": [{"role": "...", "content": "..."}, ...]}   loss on assistant turns only
               or ShareGPT: {"conversations": [{"from": "human", "value": "..."}, ...], "system": "..."?}
- completion:  {"prompt": "...", "completion": "..."}                   loss on the completion only

Rendering turns an example into text *segments*, each marked trainable or not; tokenize.py turns
those into input_ids and labels. Keeping prompt and response apart as text (rather than finding the
response inside the tokens afterwards) is what makes the masking exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune_trainer.data.errors import DataError, json_type
from kubetune_trainer.data.readers import Record

Format = Literal["text", "instruction", "chat", "completion"]
FORMATS: tuple[str, ...] = ("text", "instruction", "chat", "completion")
ROLES = ("system", "user", "assistant")

# Detection order matters only for records that carry the keys of several formats.
_DETECT_KEYS: tuple[tuple[str, str], ...] = (
    ("messages", "chat"),
    ("conversations", "chat"),  # ShareGPT
    ("instruction", "instruction"),
    ("prompt", "completion"),
    ("text", "text"),
)
_FORMAT_HELP = (
    'one of {"text": ...} | {"instruction": ..., "input": ... (optional), "output": ...} | '
    '{"messages": [{"role": ..., "content": ...}]} | {"prompt": ..., "completion": ...}'
)

# Alpaca-style instruction template (without Alpaca's long preamble, which costs tokens and teaches
# nothing). The "### Input:" block is left out when the input is empty.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# Used when the tokenizer has no chat_template. Plain-text role headers work with any vocabulary
# (ChatML markers such as <|im_start|> would be split into many pieces by a tokenizer that lacks
# them). Each assistant turn ends with the EOS token so the model learns to stop; nothing follows it
# inside the turn, so the trained tokens are exactly "content + EOS".
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ '### Assistant:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Rendered:
    """An example as text: segments (text, trainable), plus the prompt/reference pair for evaluation.

    ``chat`` segments come from a chat template and already contain any BOS/EOS text; the others get
    the tokenizer's own leading special tokens and a final EOS in tokenize.py.
    """

    segments: tuple[tuple[str, bool], ...]
    prompt: str
    reference: str
    chat: bool

    @property
    def text(self) -> str:
        return "".join(seg for seg, _ in self.segments)


def detect_format(record: Record) -> Format:
    """The format of a file, from the keys of its first record."""
    for key, fmt in _DETECT_KEYS:
        if key in record.data:
            return fmt  # type: ignore[return-value]
    keys = ", ".join(sorted(record.data)) or "(none)"
    fix = f"give each record the keys of {_FORMAT_HELP}, or set the format explicitly"
    raise record.error(None, f"cannot tell the data format from the keys of the first record ({keys})", fix)


def _string(record: Record, field: str, value: Any, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if isinstance(value, str):
        return value
    if value is None:
        raise record.error(field, "is null", f'give "{field}" a string value, or remove the record')
    if isinstance(value, int | float) and not isinstance(value, bool):
        fix = f'make "{field}" a JSON string: "{field}": "{value}"'
    else:
        fix = f'make "{field}" a JSON string'
    raise record.error(field, f"expected a string, got {json_type(value)}", fix)


# Names other datasets use for our fields: a record with one of them gets "rename X to Y" as the fix.
_ALIASES = {
    "output": ("response", "answer", "target"),
    "completion": ("response", "answer", "target"),
    "instruction": ("question", "query"),
    "messages": ("conversation", "dialog"),
}


def _require(record: Record, field: str, fmt: str) -> Any:
    if field not in record.data:
        alias = next((a for a in _ALIASES.get(field, ()) if a in record.data), None)
        fix = (
            f'rename "{alias}" to "{field}"'
            if alias
            else f'add "{field}" to this record, or fix the file\'s format ({_FORMAT_HELP})'
        )
        raise record.error(field, f"missing field '{field}' (the file is read as {fmt} data)", fix)
    return record.data[field]


def validate(record: Record, fmt: Format, *, require_response: bool = True) -> dict[str, Any]:
    """The record's fields in canonical form (strings only), or a DataError naming the bad field."""
    d = record.data
    if fmt == "text":
        return {"text": _string(record, "text", _require(record, "text", fmt))}
    if fmt == "instruction":
        out = {
            "instruction": _string(record, "instruction", _require(record, "instruction", fmt)),
            "input": _string(record, "input", d.get("input"), optional=True),
            "output": "",
        }
        if require_response or "output" in d:
            out["output"] = _string(record, "output", _require(record, "output", fmt))
        return out
    if fmt == "completion":
        out = {"prompt": _string(record, "prompt", _require(record, "prompt", fmt)), "completion": ""}
        if require_response or "completion" in d:
            out["completion"] = _string(record, "completion", _require(record, "completion", fmt))
        return out
    if fmt == "chat":
        if "messages" not in d and "conversations" in d:
            return {"messages": _sharegpt_messages(record)}
        return {"messages": _messages(record, _require(record, "messages", fmt))}
    raise ValueError(f"unknown format {fmt!r}")


def _messages(record: Record, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        fix = 'make "messages" an array of {"role": ..., "content": ...} objects'
        if record.unit == "row" or isinstance(value, str):
            fix += " (chat data must be JSON or JSON Lines: a CSV cell cannot hold a list)"
        raise record.error("messages", f"expected an array, got {json_type(value)}", fix)
    if not value:
        raise record.error("messages", "is an empty array", "add at least a user and an assistant message")
    out = []
    for j, msg in enumerate(value):
        where = f"messages[{j}]"
        if not isinstance(msg, dict):
            raise record.error(
                where,
                f"expected an object, got {json_type(msg)}",
                'write each message as {"role": ..., "content": ...}',
            )
        for key in ("role", "content"):
            if key not in msg:
                raise record.error(f"{where}.{key}", f"missing field '{key}'", f'add "{key}" to this message')
        role = _string(record, f"{where}.role", msg["role"])
        if role not in ROLES:
            raise record.error(
                f"{where}.role", f"unknown role '{role}'", f"use one of {', '.join(repr(r) for r in ROLES)}"
            )
        out.append({"role": role, "content": _string(record, f"{where}.content", msg["content"])})
    return out


# ShareGPT speaker names (the "from" of a turn) -> chat roles, as Axolotl and LLaMA-Factory read them.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


def _sharegpt_messages(record: Record) -> list[dict[str, str]]:
    """ShareGPT ``conversations`` (plus an optional top-level ``system``) as chat messages."""
    value = record.data["conversations"]
    if not isinstance(value, list):
        fix = 'make "conversations" an array of {"from": ..., "value": ...} objects'
        if record.unit == "row" or isinstance(value, str):
            fix += " (chat data must be JSON or JSON Lines: a CSV cell cannot hold a list)"
        raise record.error("conversations", f"expected an array, got {json_type(value)}", fix)
    if not value:
        raise record.error("conversations", "is an empty array", "add at least a human and a gpt turn")
    out = []
    for j, turn in enumerate(value):
        where = f"conversations[{j}]"
        if not isinstance(turn, dict):
            raise record.error(
                where,
                f"expected an object, got {json_type(turn)}",
                'write each turn as {"from": ..., "value": ...}',
            )
        for key in ("from", "value"):
            if key not in turn:
                raise record.error(
                    f"{where}.{key}", f"missing field '{key}'", 'give each ShareGPT turn "from" and "value"'
                )
        speaker = _string(record, f"{where}.from", turn["from"])
        role = SHAREGPT_ROLES.get(speaker.strip().lower())
        if role is None:
            known = ", ".join(repr(r) for r in SHAREGPT_ROLES)
            raise record.error(
                f"{where}.from",
                f"unknown role '{speaker}'",
                f"use one of {known} (human/user -> user, gpt/assistant/model -> assistant), "
                "or convert the file to messages with role/content yourself",
            )
        out.append({"role": role, "content": _string(record, f"{where}.value", turn["value"])})
    system = _string(record, "system", record.data.get("system"), optional=True)
    if system.strip():
        if out[0]["role"] == "system":
            raise record.error(
                "system",
                'a system prompt both in the top-level "system" field and as the first turn',
                'keep one of them: remove "system" or the first {"from": "system"} turn',
            )
        out.insert(0, {"role": "system", "content": system})
    return out


def is_empty(fields: dict[str, Any], fmt: Format) -> bool:
    """True when the example has nothing to learn from (blank text or blank response)."""
    if fmt == "text":
        return not fields["text"].strip()
    if fmt == "instruction":
        return not fields["instruction"].strip() or not fields["output"].strip()
    if fmt == "completion":
        return not fields["completion"].strip()
    # An assistant message that opens the conversation has no prompt before it: context, not trained.
    return not any(m["role"] == "assistant" and m["content"].strip() for m in fields["messages"][1:])


def dedupe_texts(fields: dict[str, Any], fmt: Format) -> list[str]:
    """The strings that identify an example, in a fixed order, for duplicate detection."""
    if fmt == "chat":
        return [part for m in fields["messages"] for part in (m["role"], m["content"])]
    return [fields[k] for k in _FIELD_ORDER[fmt]]


_FIELD_ORDER = {
    "text": ("text",),
    "instruction": ("instruction", "input", "output"),
    "completion": ("prompt", "completion"),
}


def instruction_prompt(instruction: str, input_: str) -> str:
    if input_.strip():
        return INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction=instruction, input=input_)
    return INSTRUCTION_TEMPLATE.format(instruction=instruction)


def chat_template_for(tokenizer: Any) -> str:
    """The tokenizer's own chat template, or kubetune's fallback when it has none.

    Save the tokenizer with ``tokenizer.chat_template = chat_template_for(tokenizer)`` so that serving
    renders conversations exactly as training did.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default")
    return template or FALLBACK_CHAT_TEMPLATE


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, record: Record
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template_for(tokenizer),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as exc:  # jinja raises TemplateError, templates call raise_exception(...)
        raise record.error(
            "messages",
            f"the chat template rejected this conversation: {exc}",
            "order the messages as the model's chat template expects (usually an optional system message, "
            "then user and assistant turns alternating)",
        ) from None


def render(tokenizer: Any, fields: dict[str, Any], fmt: Format, record: Record) -> Rendered:
    if fmt == "text":
        return Rendered(((fields["text"], True),), "", fields["text"], chat=False)
    if fmt == "completion":
        return Rendered(
            ((fields["prompt"], False), (fields["completion"], True)),
            fields["prompt"],
            fields["completion"],
            chat=False,
        )
    if fmt == "instruction":
        prompt = instruction_prompt(fields["instruction"], fields["input"])
        return Rendered(((prompt, False), (fields["output"], True)), prompt, fields["output"], chat=False)
    return _render_chat_segments(tokenizer, fields["messages"], record)


def _render_chat_segments(tokenizer: Any, messages: list[dict[str, str]], record: Record) -> Rendered:
    # Assistant turns are located by rendering growing prefixes of the conversation: the text a turn
    # adds after the generation prompt is exactly what the model has to produce at inference time.
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0)
    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = ""
    for i in range(1, last + 1):
        if messages[i]["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], True, record)
        full = render_chat(tokenizer, messages[: i + 1], False, record)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise record.error(
                "messages",
                "the tokenizer's chat template renders earlier turns differently once later turns are added, "
                "so the assistant turns cannot be located",
                "use a chat template whose rendering of the first turns is a prefix of the whole conversation's "
                "(or clear tokenizer.chat_template to use kubetune's documented fallback template)",
            )
        segments += [
            (prompt[len(done) :], False),
            *_split_after_eos(full[len(prompt) :], tokenizer.eos_token),
        ]
        done = full
    return Rendered(tuple(segments), prompt, messages[last]["content"], chat=True)


def _split_after_eos(turn: str, eos: str | None) -> list[tuple[str, bool]]:
    # Text a template writes after the turn's EOS (often a newline) is never generated: the model
    # stops at EOS. It stays in the input but is not trained.
    cut = turn.rfind(eos) + len(eos) if eos and eos in turn else len(turn)
    return [(turn[:cut], True), (turn[cut:], False)] if cut < len(turn) else [(turn, True)]


def format_prompt(tokenizer: Any, example: dict[str, Any], format: str = "auto") -> str:
    """The prompt text training used for this example, for generation at evaluation or serving time.

    The response (output / completion / a final assistant message) may be present; it is left out.
    Chat prompts already hold the template's special tokens: tokenize them with
    ``add_special_tokens=False`` (or use ``encode_prompt``).
    """
    record = Record("<example>", 1, example)
    fmt = detect_format(record) if format == "auto" else check_format_name(format, "<example>")
    fields = validate(record, fmt, require_response=False)
    if fmt == "text":
        return fields["text"]
    if fmt == "completion":
        return fields["prompt"]
    if fmt == "instruction":
        return instruction_prompt(fields["instruction"], fields["input"])
    messages = fields["messages"]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render_chat(tokenizer, messages, True, record)


def check_format_name(fmt: str, file: str) -> Format:
    if fmt not in FORMATS:
        raise DataError(
            file,
            f"unknown format '{fmt}'",
            f"set format to 'auto' or one of {', '.join(repr(f) for f in FORMATS)}",
            field="format",
        )
    return fmt  # type: ignore[return-value]
