"""Bad data fails fast with a DataError naming the file, the line and the field, and a fix."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer.data import DataError, DataOptions, DataSource, prepare_datasets
from kubetune_trainer.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def data_error(tokenizer, path, fmt="auto") -> DataError:
    with pytest.raises(DataError) as err:
        prepare_datasets(tokenizer, [DataSource(str(path), format=fmt)], DataOptions())
    assert "Fix: " in str(err.value)
    return err.value


def lines(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


GOOD = {"instruction": "Say hi", "output": "hi"}


def test_invalid_json_in_jsonl_names_line_and_column(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(lines(GOOD, GOOD, '{"instruction": "x", "output": "y"'))
    err = data_error(tokenizer, path)
    assert "train.jsonl, line 3, column 35: invalid JSON" in str(err)  # the end of the line
    assert (err.line, err.column) == (3, 35)


def test_invalid_json_in_array_names_line(tokenizer, tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n')  # missing comma
    err = data_error(tokenizer, path)
    assert "train.json, line 4" in str(err) and "invalid JSON" in str(err)


def test_trailing_comma_in_array(tokenizer, tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n]\n')
    assert "train.json, line 3, column 1: invalid JSON" in str(data_error(tokenizer, path))


def test_missing_field_names_line_and_field(tokenizer, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(lines(GOOD, GOOD, GOOD, {"instruction": "Say bye", "response": "bye"}))
    err = data_error(tokenizer, path)
    assert "tasks.jsonl, line 4, field 'output': missing field 'output'" in str(err)
    assert (err.line, err.field) == (4, "output")
    assert err.fix == 'rename "response" to "output"'


def test_wrong_type_says_how_to_fix(tokenizer, tmp_path):
    path = tmp_path / "nums.json"
    path.write_text(json.dumps([GOOD, {"instruction": "Add 1 and 1", "output": 2}], indent=2))
    err = data_error(tokenizer, path)
    assert "nums.json, line 6, field 'output': expected a string, got a number" in str(err)
    assert 'make "output" a JSON string: "output": "2"' in str(err)


def test_null_field(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(lines({"text": "ok"}, {"text": None}))
    assert "t.jsonl, line 2, field 'text': is null" in str(data_error(tokenizer, path))


def test_unknown_role(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    path.write_text(
        lines({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, bad)
    )
    err = data_error(tokenizer, path)
    assert "chat.jsonl, line 2, field 'messages[1].role': unknown role 'bot'" in str(err)
    assert "'system', 'user', 'assistant'" in err.fix


@pytest.mark.parametrize(
    "record,field,problem",
    [
        ({"messages": "hi"}, "messages", "expected an array, got a string"),
        ({"messages": []}, "messages", "is an empty array"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing field 'content'"),
        (
            {"messages": [{"role": "user", "content": ["a"]}]},
            "messages[0].content",
            "expected a string, got an array",
        ),
        ({"messages": ["hi"]}, "messages[0]", "expected an object, got a string"),
    ],
)
def test_malformed_messages(tokenizer, tmp_path, record, field, problem):
    path = tmp_path / "chat.jsonl"
    path.write_text(lines(record))
    assert f"chat.jsonl, line 1, field '{field}': {problem}" in str(data_error(tokenizer, path))


def test_empty_file(tokenizer, tmp_path):
    for name, content in (
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("empty.json", "[]"),
        ("empty.csv", ""),
    ):
        path = tmp_path / name
        path.write_text(content)
        assert f"{name}: the file holds no records" in str(data_error(tokenizer, path))


def test_unknown_format_from_keys(tokenizer, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(lines({"question": "q", "answer": "a"}))
    err = data_error(tokenizer, path)
    assert (
        "odd.jsonl, line 1: cannot tell the data format from the keys of the first record (answer, question)"
        in str(err)
    )
    assert '{"prompt": ..., "completion": ...}' in err.fix


def test_sharegpt_unknown_role_names_file_line_and_role(tokenizer, tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(lines(good, bad))
    err = data_error(tokenizer, path)
    assert "sharegpt.jsonl, line 2, field 'conversations[1].from': unknown role 'bot'" in str(err)
    assert (err.line, err.field) == (2, "conversations[1].from")
    assert "'human'" in err.fix and "'gpt'" in err.fix and "messages with role/content" in err.fix


def test_unknown_format_name(tmp_path):
    with pytest.raises(DataError) as err:
        DataSource(str(tmp_path / "x.jsonl"), format="alpaca")
    assert "x.jsonl, field 'format': unknown format 'alpaca'" in str(err.value)


def test_records_must_match_the_explicit_format(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(lines({"text": "hello"}))
    err = data_error(tokenizer, path, fmt="chat")
    assert (
        "t.jsonl, line 1, field 'messages': missing field 'messages' (the file is read as chat data)"
        in str(err)
    )


def test_record_that_is_not_an_object(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(lines({"text": "a"}, '["b"]'))
    assert "t.jsonl, line 2: each record must be a JSON object, got an array" in str(
        data_error(tokenizer, path)
    )


def test_missing_file_and_unsupported_type(tokenizer, tmp_path):
    assert "nope.jsonl: file not found" in str(data_error(tokenizer, tmp_path / "nope.jsonl"))
    path = tmp_path / "data.txt"
    path.write_text("hello")
    assert "data.txt: unsupported file type '.txt'" in str(data_error(tokenizer, path))


def test_not_utf8(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert "latin1.jsonl, line 2: not valid UTF-8" in str(data_error(tokenizer, path))


def test_error_comes_before_any_tokenisation(tokenizer, tmp_path):
    # A bad record at the end of the file is reported even though earlier records are fine, and the
    # tokenizer is never called for the file (validation runs first).
    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, text, **kwargs):
            self.calls += 1
            return self.inner(text, **kwargs)

    path = tmp_path / "late.jsonl"
    path.write_text(lines(*([GOOD] * 50), {"instruction": "x", "output": 3}))
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(DataError, match="line 51, field 'output'"):
        prepare_datasets(counting, [DataSource(str(path))], DataOptions())
    assert counting.calls == 2  # only the probe that finds the tokenizer's BOS, never the data


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_seq_length": 1}, "max_seq_length must be an integer >= 2"),
        ({"dedupe": "fuzzy"}, "dedupe must be one of none, exact, normalized"),
        ({"validation_split": 1.0}, "validation_split must be between 0 and 1"),
        ({"replay_fraction": -0.1}, "replay_fraction must be >= 0 and < 1"),
        ({"replay_fraction": 1.0}, "replay_fraction must be >= 0 and < 1"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        DataOptions(**options)


def test_invalid_weight(tmp_path):
    with pytest.raises(DataError, match="field 'weight': weight must be a positive number"):
        DataSource(str(tmp_path / "a.jsonl"), weight=0)


@pytest.mark.parametrize(
    "template,problem",
    [
        # Rejects conversations that do not start with a user turn (as some model templates do).
        (
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "the chat template rejected this conversation: must start with user",
        ),
        # Renders only the last turn: earlier turns change once later ones are added.
        ("{{ messages[-1]['content'] if messages else '' }}", "renders earlier turns differently"),
    ],
)
def test_chat_template_problems_name_the_record(tokenizer, tmp_path, template, problem):
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        path = tmp_path / "chat.jsonl"
        # An opening assistant turn is context; the template sees it when the prompt is rendered.
        opening = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}]
        path.write_text(lines({"messages": [*opening, {"role": "assistant", "content": "Bye"}]}))
        err = data_error(tokenizer, path)
        assert "chat.jsonl, line 1, field 'messages'" in str(err) and problem in str(err)
    finally:
        tokenizer.chat_template = saved
