"""Formats: detection, templates and loss masking (the trained tokens are exactly the response)."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataOptions,
    DataSource,
    chat_template_for,
    encode_prompt,
    format_prompt,
    prepare_datasets,
)
from kubetune_trainer.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (the fallback template applies)."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    yield tokenizer
    tokenizer.chat_template = saved


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def prepare(tokenizer, path, **options):
    return prepare_datasets(tokenizer, [DataSource(path)], DataOptions(**options))


def trained_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])


def test_text_format_trains_on_every_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat."}, {"text": "Red sun, blue sea."}])
    data = prepare(tokenizer, path)
    assert data.stats.source(path).format == "text"
    item = data.train[0]
    assert item["input_ids"][0] == tokenizer.bos_token_id and item["input_ids"][-1] == tokenizer.eos_token_id
    # Everything but the BOS (which is never predicted) is trained.
    assert item["labels"] == [IGNORE_INDEX, *item["input_ids"][1:]]
    assert trained_text(tokenizer, item) == "The cat sat.</s>"


def test_instruction_format_masks_the_prompt(tokenizer, tmp_path):
    rows = [
        {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"},
        {"instruction": "Name the capital of France.", "output": "Paris"},
    ]
    data = prepare(tokenizer, write_jsonl(tmp_path / "i.jsonl", rows))
    with_input, without_input = data.train[0], data.train[1]
    assert trained_text(tokenizer, with_input) == "cba</s>"
    assert trained_text(tokenizer, without_input) == "Paris</s>"
    assert tokenizer.decode(with_input["input_ids"], skip_special_tokens=True) == (
        "### Instruction:\nReverse the letters.\n\n### Input:\nabc\n\n### Response:\ncba"
    )
    # The Input block is left out when there is no input.
    assert "### Input" not in tokenizer.decode(without_input["input_ids"])
    # Masked positions are a prefix: the prompt, then the response.
    first = next(i for i, t in enumerate(with_input["labels"]) if t != IGNORE_INDEX)
    assert all(t != IGNORE_INDEX for t in with_input["labels"][first:])


def test_completion_format_masks_the_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Two plus two is", "completion": " four"}])
    data = prepare(tokenizer, path)
    assert data.stats.source(path).format == "completion"
    assert trained_text(tokenizer, data.train[0]) == " four</s>"
    assert tokenizer.decode(data.train[0]["input_ids"], skip_special_tokens=True) == "Two plus two is four"


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Capital of Spain?"},
        {"role": "assistant", "content": "Madrid"},
    ]
}


def test_chat_format_trains_assistant_turns_only_with_tokenizer_template(tokenizer, tmp_path):
    data = prepare(tokenizer, write_jsonl(tmp_path / "chat.jsonl", [CHAT]))
    item = data.train[0]
    assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False
    )
    # Each assistant turn up to and including its EOS; the template's newline after EOS is not trained.
    assert trained_text(tokenizer, item) == "Hello there</s>Madrid</s>"


def test_chat_format_uses_documented_fallback_without_template(plain_tokenizer, tmp_path):
    assert chat_template_for(plain_tokenizer) == FALLBACK_CHAT_TEMPLATE
    data = prepare(plain_tokenizer, write_jsonl(tmp_path / "chat.jsonl", [CHAT]))
    item = data.train[0]
    assert plain_tokenizer.decode(item["input_ids"]) == (
        "<s>### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello there</s>"
        "\n\n### User:\nCapital of Spain?\n\n### Assistant:\nMadrid</s>"
    )
    assert trained_text(plain_tokenizer, item) == "Hello there</s>Madrid</s>"


def test_detection_from_first_record_keys_and_explicit_format(tokenizer, tmp_path):
    # Extra keys are ignored; a record with keys of two formats goes by the documented order.
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "ignored", "prompt": "p", "completion": "c", "id": 7}])
    assert prepare(tokenizer, path).stats.source(path).format == "completion"
    data = prepare_datasets(tokenizer, [DataSource(path, format="text")], DataOptions())
    assert trained_text(tokenizer, data.train[0]) == "ignored</s>"


@pytest.mark.parametrize(
    "example,format,expected",
    [
        (
            {"instruction": "Sort", "input": "b a"},
            "auto",
            "### Instruction:\nSort\n\n### Input:\nb a\n\n### Response:\n",
        ),
        ({"prompt": "Once upon", "completion": " a time"}, "completion", "Once upon"),
        ({"text": "Hello"}, "text", "Hello"),
    ],
)
def test_format_prompt_matches_training(tokenizer, example, format, expected):
    assert format_prompt(tokenizer, example, format) == expected


@pytest.mark.parametrize("template", ["tokenizer", "fallback"])
def test_prompt_ids_are_a_prefix_of_the_training_ids(tokenizer, tmp_path, template):
    saved = tokenizer.chat_template
    if template == "fallback":
        tokenizer.chat_template = None
    try:
        rows = [
            CHAT,
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        ]
        data = prepare(tokenizer, write_jsonl(tmp_path / "chat.jsonl", rows))
        for item, ev, row in zip(data.train, data.eval_examples("train"), rows, strict=True):
            ids = item["input_ids"]
            assert ids[: len(ev["prompt_ids"])] == ev["prompt_ids"]
            assert tokenizer.decode(ids[len(ev["prompt_ids"]) :]).startswith(ev["reference"])
            assert ev["reference"] == row["messages"][-1]["content"]
            # format_prompt drops the final assistant turn and ends with the generation prompt.
            assert format_prompt(tokenizer, row) == ev["prompt"]
            assert encode_prompt(tokenizer, {"messages": row["messages"][:-1]}) == ev["prompt_ids"]
    finally:
        tokenizer.chat_template = saved


def test_eval_examples_for_instruction_data(tokenizer, tmp_path):
    rows = [{"instruction": f"Add one to {i}", "output": str(i + 1)} for i in range(10)]
    data = prepare(tokenizer, write_jsonl(tmp_path / "i.jsonl", rows), validation_split=0.2)
    examples = data.eval_examples("validation")
    assert len(examples) == 2
    for ev in examples:
        number = int(ev["prompt"].split("Add one to ")[1].split("\n")[0])
        assert ev["reference"] == str(number + 1)
        assert ev["text"] == ev["prompt"] + ev["reference"]
        assert ev["prompt_ids"] == encode_prompt(tokenizer, {"instruction": f"Add one to {number}"})
    with pytest.raises(ValueError, match="no test data"):
        data.eval_examples("test")


def test_opening_assistant_message_is_context(plain_tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "assistant", "content": "Welcome!"}]},  # nothing to learn: dropped as empty
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = prepare(plain_tokenizer, path)
    assert data.stats.source(path).empty_dropped == 1
    item = data.train[0]
    assert plain_tokenizer.decode(item["input_ids"]).startswith("<s>### Assistant:\nWelcome!</s>")
    assert trained_text(plain_tokenizer, item) == "Hello</s>"
