"""logprobs / top_logprobs, n > 1, seed, response_format and streaming usage, through the official
openai client against the real server; logprobs are checked against a plain PEFT forward pass."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator

import openai
import pytest
import torch

from kubetune_trainer.serve import ModelServer, RunningServer
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models
from tests.trainer.test_serve_http import wait_ready

__all__ = ["serve_models"]
PROMPT = "the red sun ->"


@pytest.fixture(scope="module")
def running(serve_models: ServeModels) -> Iterator[RunningServer]:
    server = ModelServer(
        base_model=str(serve_models.base),
        base_model_name="tiny",
        adapters={n: str(p) for n, p in serve_models.adapters.items()},
        dtype="float32",  # as the PEFT reference below
        batch_window_ms=30,
    )
    with server.start_background() as run:
        wait_ready(run.url)
        yield run


@pytest.fixture
def client(running: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def peft_logprobs(serve_models: ServeModels):
    """(generated ids, per-step log-softmax) of plain PEFT greedy generation, one prompt alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serve_models.base)
    base = AutoModelForCausalLM.from_pretrained(serve_models.base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(serve_models.adapters["red"]), adapter_name="red").eval()

    def run(prompt: str, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = peft.generate(
                **ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, ids.input_ids.shape[1] :].tolist()
        return new, [torch.log_softmax(s[0].float(), -1) for s in out.scores]

    run.tokenizer = tok  # type: ignore[attr-defined]
    return run


def test_completion_logprobs_match_peft(client: openai.OpenAI, peft_logprobs) -> None:
    tok = peft_logprobs.tokenizer
    ids, steps = peft_logprobs(PROMPT, 6)
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    out = client.completions.create(model="red", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None and choice.text == tok.decode(ids, skip_special_tokens=True)
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for i, (token, step) in enumerate(zip(ids, steps, strict=False)):
        assert lp.token_logprobs[i] == pytest.approx(float(step[token]), abs=1e-4)
        values, top_ids = step.topk(3)
        assert len(lp.top_logprobs[i]) == 3
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
        assert tok.decode([top_ids[0].item()]) == lp.tokens[i]  # greedy: the top token is chosen
    # logprobs=0: only the chosen tokens' logprobs.
    zero = client.completions.create(model="red", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0)
    assert zero.choices[0].logprobs.top_logprobs == [{}] * len(zero.choices[0].logprobs.tokens)
    # Without logprobs the field stays null.
    assert client.completions.create(model="red", prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the moon"}]
    out = client.chat.completions.create(
        model="num", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert content and "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and bytes(c.bytes).decode() == c.token
        assert [t.logprob for t in c.top_logprobs] == sorted(
            (t.logprob for t in c.top_logprobs), reverse=True
        )
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
    plain = client.chat.completions.create(model="num", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].message.content == out.choices[0].message.content  # logprobs change nothing
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="num", messages=messages, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="less than or equal to 20"):
        client.chat.completions.create(model="num", messages=messages, logprobs=True, top_logprobs=21)


def test_n_choices_seeded_and_reproducible(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    out = client.completions.create(n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1  # each choice samples its own sequence
    assert [c.text for c in client.completions.create(n=3, **kw).choices] == texts  # same seed, same choices
    assert client.completions.create(n=1, **kw).choices[0].text == texts[0]  # choice 0 uses the seed itself
    other = client.completions.create(n=3, **{**kw, "seed": 8})
    assert [c.text for c in other.choices] != texts
    one = client.completions.create(n=1, **kw)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens >= one.usage.completion_tokens + 2  # each choice's tokens count
    # Two prompts x two choices: index = prompt * n + choice.
    two = client.completions.create(model="red", prompt=["a ->", "b ->"], n=2, max_tokens=16, temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert {c.text for c in two.choices} == {PHRASES["red"]}
    chat = client.chat.completions.create(
        model="red", messages=[{"role": "user", "content": "x"}], n=2, max_tokens=3, seed=1, temperature=1.0
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)
    with pytest.raises(openai.BadRequestError, match="less than or equal to 16"):
        client.completions.create(model="red", prompt="x", n=17)


def test_streaming_usage_n_and_logprobs(client: openai.OpenAI) -> None:
    kw = {"model": "num", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(n=2, logprobs=True, **kw)
    stream = client.chat.completions.create(
        n=2, logprobs=True, stream=True, stream_options={"include_usage": True}, **kw
    )
    texts, tokens, usage = ["", ""], [[], []], []
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage.append(chunk.usage)
            continue
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                tokens[c.index] += [t.token for t in c.logprobs.content]
    assert texts == [c.message.content for c in whole.choices]
    assert texts[0] == texts[1] and texts[0]  # greedy: both choices give the same answer
    assert tokens == [[t.token for t in c.logprobs.content] for c in whole.choices]
    assert len(usage) == 1 and usage[0].model_dump() == whole.usage.model_dump()
    # Without include_usage no usage chunk comes.
    plain = client.completions.create(model="num", prompt="x ->", max_tokens=4, stream=True)
    assert all(chunk.usage is None for chunk in plain)
    # Completions stream the text_offset on from chunk to chunk.
    offsets: list[int] = []
    text = ""
    for chunk in client.completions.create(
        model="red", prompt="x ->", max_tokens=6, temperature=0, stream=True, logprobs=1
    ):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                offsets += c.logprobs.text_offset
    assert text == PHRASES["red"][: len(text)] and offsets[0] == 0 and offsets == sorted(offsets)


def test_seed_with_the_chat_api(client: openai.OpenAI) -> None:
    kw = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "temperature": 1.2,
    }
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=42, **kw).choices[0].message.content == a
    assert client.chat.completions.create(seed=43, **kw).choices[0].message.content != a


def test_min_tokens_keeps_generating_past_eos(client: openai.OpenAI) -> None:
    """vLLM's min_tokens extension (extra_body): EOS masked until that many tokens are out."""
    kw = {"model": "red", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    plain = client.completions.create(**kw)
    assert (
        plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 30
    )  # the adapter's EOS
    longer = client.completions.create(**kw, extra_body={"min_tokens": 30})
    assert longer.usage.completion_tokens >= 30
    assert longer.choices[0].text.startswith(plain.choices[0].text)  # greedy up to where EOS was masked
    with pytest.raises(openai.BadRequestError, match=r"min_tokens \(6\) must be at most max_tokens \(5\)"):
        client.completions.create(**{**kw, "max_tokens": 5}, extra_body={"min_tokens": 6})


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "count": {"type": "integer"}},
    "required": ["answer", "count"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_json_object(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    for seed in range(3):  # sampled: the grammar, not luck, makes it parse
        out = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=64, temperature=1.0, seed=seed, response_format=fmt
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        data = json.loads(choice.message.content)
        assert set(data) == {"answer", "count"} and data["answer"] in ("yes", "no")
        assert isinstance(data["count"], int)
    # The adapters too (their own answer, " red cat ...", is not JSON at all). A schema with only
    # an enum must close within a few tokens; json_object leaves strings open-ended, so an adapter
    # that wants to repeat its phrase may fill max_tokens inside one (cut short, as OpenAI's is).
    verdict = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    red = client.chat.completions.create(
        model="red",
        messages=messages,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": verdict}},
    )
    assert red.choices[0].finish_reason == "stop", red.choices[0].message.content
    assert json.loads(red.choices[0].message.content)["answer"] in ("yes", "no")
    obj = client.chat.completions.create(
        model="red", messages=messages, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    ).choices[0]
    assert obj.message.content.startswith("{"), obj.message.content
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    ok = client.chat.completions.create(
        model="red", messages=messages, max_tokens=2, response_format={"type": "text"}
    )
    assert ok.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="red",
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
    assert exc.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="use text, json_object or json_schema"):
        client.chat.completions.create(model="red", messages=messages, response_format={"type": "xml"})


def test_a_constrained_row_changes_no_other_row_of_its_batch(client: openai.OpenAI) -> None:
    """Greedy answers stay those of plain generation while JSON requests share their batches."""
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}

    def constrained(seed: int) -> str:
        return (
            client.chat.completions.create(
                model="num",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=64,
                seed=seed,
                response_format=fmt,
            )
            .choices[0]
            .message.content
        )

    def plain(i: int) -> str:
        return (
            client.completions.create(model="red", prompt=f"the {i} ->", max_tokens=16, temperature=0)
            .choices[0]
            .text
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jsons = [pool.submit(constrained, s) for s in range(4)]
        plains = [pool.submit(plain, i) for i in range(4)]
        assert [f.result() for f in plains] == [PHRASES["red"]] * 4
        assert all(json.loads(f.result())["answer"] in ("yes", "no") for f in jsons)
