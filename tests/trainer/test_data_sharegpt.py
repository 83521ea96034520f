"""ShareGPT data (``conversations`` of ``from``/``value`` turns) is read as chat data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.data import DataError, DataOptions, DataSource, format_prompt, prepare_datasets
from kubetune_trainer.data.formats import SHAREGPT_ROLES, detect_format, validate
from kubetune_trainer.data.readers import Record, read_records
from kubetune_trainer.tiny_model import build_tokenizer

from .test_data_formats import CHAT, trained_text, write_jsonl

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello there"},
        {"from": "human", "value": "Capital of Spain?"},
        {"from": "gpt", "value": "Madrid"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def record(data: dict, line: int = 1) -> Record:
    return Record("data.jsonl", line, data)


def test_detected_as_chat_and_mapped_to_the_same_messages():
    rec = record(SHAREGPT)
    assert detect_format(rec) == "chat"
    assert validate(rec, "chat") == {"messages": CHAT["messages"]}


@pytest.mark.parametrize(
    ("speaker", "role"),
    [
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("assistant", "assistant"),
        ("model", "assistant"),
        ("system", "system"),
        ("Human", "user"),  # speaker names are read case-insensitively
    ],
)
def test_role_mapping(speaker, role):
    assert SHAREGPT_ROLES[speaker.lower()] == role
    rec = record({"conversations": [{"from": speaker, "value": "x"}]})
    assert validate(rec, "chat")["messages"] == [{"role": role, "content": "x"}]


def test_top_level_system_prompt_comes_first():
    data = {"system": "Answer in French.", "conversations": SHAREGPT["conversations"][1:3]}
    assert validate(record(data), "chat")["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ]
    # An empty system field adds nothing.
    data = {"system": "", "conversations": SHAREGPT["conversations"][1:3]}
    assert [m["role"] for m in validate(record(data), "chat")["messages"]] == ["user", "assistant"]


def test_two_system_prompts_are_an_error():
    with pytest.raises(DataError) as err:
        validate(record({"system": "A", **SHAREGPT}, line=3), "chat")
    assert "data.jsonl, line 3, field 'system'" in str(err.value)
    assert "Fix: keep one of them" in str(err.value)


@pytest.mark.parametrize(
    ("turns", "where", "problem"),
    [
        ([{"from": "tool", "value": "42"}], "conversations[0].from", "unknown role 'tool'"),
        ([{"from": "human"}], "conversations[0].value", "missing field 'value'"),
        ([{"value": "hi"}], "conversations[0].from", "missing field 'from'"),
        ([{"from": "human", "value": 3}], "conversations[0].value", "expected a string, got a number"),
        ([], "conversations", "is an empty array"),
        ("hi", "conversations", "expected an array, got a string"),
    ],
)
def test_bad_turns_name_line_field_and_fix(turns, where, problem):
    with pytest.raises(DataError) as err:
        validate(record({"conversations": turns}, line=7), "chat")
    assert f"data.jsonl, line 7, field '{where}': {problem}. Fix: " in str(err.value)


def test_trained_exactly_like_the_same_messages(tokenizer, tmp_path):
    sharegpt = prepare_datasets(
        tokenizer, [DataSource(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT]))], DataOptions()
    )
    chat = prepare_datasets(tokenizer, [DataSource(write_jsonl(tmp_path / "c.jsonl", [CHAT]))], DataOptions())
    assert sharegpt.stats.sources[0].format == "chat"
    assert sharegpt.train[0] == chat.train[0]
    # Loss on the assistant (gpt) turns only.
    assert trained_text(tokenizer, sharegpt.train[0]) == "Hello there</s>Madrid</s>"
    # An explicit format: chat reads ShareGPT too.
    explicit = prepare_datasets(
        tokenizer, [DataSource(str(tmp_path / "s.jsonl"), format="chat")], DataOptions()
    )
    assert explicit.train[0] == chat.train[0]


def test_format_prompt_leaves_out_the_last_gpt_turn(tokenizer):
    assert format_prompt(tokenizer, SHAREGPT) == format_prompt(tokenizer, CHAT)


def test_sample_file_is_sharegpt():
    path = Path(__file__).resolve().parents[2] / "examples" / "data" / "chat-sharegpt.jsonl"
    records = read_records(path)
    assert all("conversations" in r.data for r in records)
    assert any("system" in r.data for r in records)
    for rec in records:
        assert detect_format(rec) == "chat"
        validate(rec, "chat")


def test_end_to_end_training_on_sharegpt(tiny_model_dir, tmp_path):
    from kubetune_trainer import FinetuningConfig, ModelFinetuner

    rows = [
        {
            "system": "You repeat the colour twice.",
            "conversations": [{"from": "human", "value": c}, {"from": "gpt", "value": f"{c} {c}"}],
        }
        for c in ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuningConfig(
        model_name=str(tiny_model_dir),
        output_dir=str(tmp_path / "out"),
        train_file=str(train),
        validation_split=0.25,
        precision="fp32",
        method="lora",
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        progress_bar=False,
        resume="never",
        seed=0,
    )
    ft = ModelFinetuner(cfg)
    try:
        ft.load_model()
        before = ft.evaluate()
        ft.train()
        after = ft.evaluate()
        out = ft.save_model()
    finally:
        ft.close()
    assert ft.data.stats.sources[0].format == "chat"
    assert ft.data.stats.train_examples + ft.data.stats.validation_examples == len(rows)
    # The model learned something from the gpt turns.
    losses = [h["loss"] for h in ft.trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert after["eval_loss"] < before["eval_loss"]
    assert (out / "adapter_model.safetensors").is_file()
    reply = ft.generate(
        [{"role": "system", "content": "You repeat the colour twice."}, {"role": "user", "content": "red"}],
        max_new_tokens=4,
        temperature=0,
    )
    assert isinstance(reply, str)
