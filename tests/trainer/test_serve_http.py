"""The HTTP API against a real uvicorn server: the official openai client, errors, adapters, probes."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer.serve import ModelServer, RunningServer
from tests.conftest import eventually
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models

__all__ = ["serve_models"]
CHAT = "/v1/chat/completions"


def wait_ready(url: str, timeout: float = 120) -> dict:
    return eventually(
        lambda: httpx.get(f"{url}/ready").status_code == 200 and httpx.get(f"{url}/ready").json(),
        timeout=timeout,
        what="the server to become ready",
    )


@pytest.fixture(scope="module")
def running(serve_models: ServeModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = ModelServer(
        base_model=str(serve_models.base),
        base_model_name="tiny",
        adapters={n: str(p) for n, p in serve_models.adapters.items()},
        batch_window_ms=30,
        # Load/unload on, from the test's temporary directories (test_serve_auth covers the refusals).
        runtime_adapter_updates=True,
        adapter_roots=[str(tmp_path_factory.getbasetemp())],
    )
    with server.start_background() as run:
        wait_ready(run.url)
        yield run


@pytest.fixture
def client(running: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def http(running: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running.url, timeout=120) as c:
        yield c


def metrics(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


# ----------------------------------------------------------------------------- the openai client


def test_models_lists_the_base_and_every_adapter(client: openai.OpenAI, serve_models: ServeModels) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "red", "num"}
    assert models["red"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["parent"] is None
    assert models["red"].model_extra["root"] == str(serve_models.adapters["red"])
    assert client.models.retrieve("num").id == "num"


def test_completions_per_adapter(client: openai.OpenAI) -> None:
    for model, phrase in PHRASES.items():
        out = client.completions.create(model=model, prompt="the dog ->", max_tokens=16, temperature=0)
        assert out.choices[0].text == phrase
        assert out.choices[0].finish_reason == "stop"
        assert out.model == model
        assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    base = client.completions.create(model="tiny", prompt="the dog ->", max_tokens=5, temperature=0)
    assert base.choices[0].text not in PHRASES.values()
    assert base.choices[0].finish_reason == "length"
    assert base.usage.completion_tokens == 5


def test_several_prompts_in_one_request(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="num", prompt=["a ->", "b c ->", "the sun ->"], max_tokens=16, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.text == PHRASES["num"] for c in out.choices)


def test_chat_completions_use_the_chat_template(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="red",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=16,
        temperature=0,
        seed=3,
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    # Trained on plain prompts, each adapter still answers chats in its own words (chats are far from
    # its training prompts, so only words are checked: the exact phrase was seen to lose a token).
    assert {"red", "cat"} & set(out.choices[0].message.content.split())
    other = client.chat.completions.create(
        model="num", messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=0
    )
    assert {"one", "two", "three", "four"} & set(other.choices[0].message.content.split())
    # prompt tokens = the rendered template: BOS, role markers and EOS per turn (tiny model's template)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(client.models.retrieve("tiny").model_extra["root"])
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(rendered, add_special_tokens=False).input_ids
    assert out.usage.prompt_tokens == len(ids)
    # The chat is exactly a completion of the rendered template's tokens.
    same = client.completions.create(model="red", prompt=ids, max_tokens=16, temperature=0)
    assert same.choices[0].text == out.choices[0].message.content


def test_streaming_completions_and_chat(client: openai.OpenAI) -> None:
    full = client.completions.create(model="num", prompt="the sun ->", max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(model="num", prompt="the sun ->", max_tokens=16, temperature=0, stream=True)
    )
    assert len(chunks) > 3  # token by token, not one blob
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text == PHRASES["num"]
    assert chunks[-1].choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model="red",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    finals = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finals == ["stop"] or finals == ["length"]
    assert events[-1].choices == [] and events[-1].usage.completion_tokens > 0
    non_stream = client.chat.completions.create(
        model="red", messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0
    )
    assert text == non_stream.choices[0].message.content


def test_raw_sse_format(http: httpx.Client) -> None:
    body = {"model": "red", "prompt": "x ->", "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: ") :])["object"] == "text_completion"


def test_stop_sequences_and_seeded_sampling(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="red", prompt="a ->", max_tokens=16, temperature=0, stop=[" cat", "zzz"]
    )
    assert out.choices[0].text == " red"
    assert out.choices[0].finish_reason == "stop"
    same = [
        client.completions.create(
            model="tiny", prompt="a ->", max_tokens=12, temperature=1.0, top_p=0.9, seed=11
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert same[0] == same[1]


def test_concurrent_requests_for_different_adapters_share_batches(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    before = metrics(http)
    jobs = [("red", "the cat ->"), ("num", "the cat ->"), ("tiny", "the cat ->")] * 4

    def call(job):
        model, prompt = job
        return model, client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0
        ).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    base_answer = (
        client.completions.create(model="tiny", prompt="the cat ->", max_tokens=16, temperature=0)
        .choices[0]
        .text
    )
    for model, text in results:
        assert text == PHRASES.get(model, base_answer)
    after = metrics(http)
    # Some batch held more than one model (the histogram's +Inf-excluded bucket le=1 did not get them all).
    new_batches = metric(after, "kubetune_serve_batch_models_count") - metric(
        before, "kubetune_serve_batch_models_count"
    )
    single_model = metric(after, "kubetune_serve_batch_models_bucket", le="1.0") - metric(
        before, "kubetune_serve_batch_models_bucket", le="1.0"
    )
    assert new_batches > single_model, "no batch mixed adapters"


def test_metrics_have_per_adapter_series(client: openai.OpenAI, http: httpx.Client) -> None:
    before = metrics(http)
    for model in ("red", "num"):
        client.completions.create(model=model, prompt="go ->", max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="go ->", max_tokens=3)
    with pytest.raises(openai.BadRequestError):  # a known model's bad request counts under its name
        client.completions.create(model="red", prompt="go ->", max_tokens=5000)
    streamed = list(
        client.chat.completions.create(
            model="num",
            messages=[{"role": "user", "content": "go"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    values = metrics(http)
    # Streams are counted too: status, time to first token, and the tokens their usage chunk reports.
    assert metric(values, "kubetune_serve_requests_total", model="num", endpoint=CHAT, status="200") == (
        metric(before, "kubetune_serve_requests_total", model="num", endpoint=CHAT, status="200") + 1
    )
    assert (
        metric(values, "kubetune_serve_completion_tokens_total", model="num")
        - metric(before, "kubetune_serve_completion_tokens_total", model="num")
        == 3 + streamed[-1].usage.completion_tokens
    )
    assert metric(values, "kubetune_serve_time_to_first_token_seconds_count", model="num") > metric(
        before, "kubetune_serve_time_to_first_token_seconds_count", model="num"
    )
    assert metric(
        values, "kubetune_serve_requests_total", model="red", endpoint="/v1/completions", status="400"
    ) == 1 + metric(
        before, "kubetune_serve_requests_total", model="red", endpoint="/v1/completions", status="400"
    )
    for model in ("red", "num"):
        assert (
            metric(
                values, "kubetune_serve_requests_total", model=model, endpoint="/v1/completions", status="200"
            )
            >= 1
        )
        assert metric(values, "kubetune_serve_completion_tokens_total", model=model) >= 3
        assert metric(values, "kubetune_serve_prompt_tokens_total", model=model) >= 1
        assert (
            metric(
                values,
                "kubetune_serve_request_duration_seconds_count",
                model=model,
                endpoint="/v1/completions",
            )
            >= 1
        )
        assert metric(values, "kubetune_serve_batch_rows_count", model=model) >= 1
        assert metric(values, "kubetune_serve_adapter_loaded", model=model) == 1
    assert (
        metric(
            values, "kubetune_serve_requests_total", model="unknown", endpoint="/v1/completions", status="404"
        )
        >= 1
    )


# ----------------------------------------------------------------------------- errors


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "text"),
    [
        ("/v1/completions", b'{"model": "red", "prompt": ', 400, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
        ("/v1/completions", {"model": "red"}, 400, "prompt", "required"),
        ("/v1/completions", {"model": "red", "prompt": 7}, 400, "prompt", "must be a string"),
        (
            "/v1/completions",
            {"model": "red", "prompt": "x", "max_tokens": "ten"},
            400,
            "max_tokens",
            "integer",
        ),
        (
            "/v1/completions",
            {"model": "red", "prompt": "x", "temperature": 5},
            400,
            "temperature",
            "less than",
        ),
        ("/v1/completions", {"model": "red", "prompt": "x", "stop": [1]}, 400, "stop", "strings"),
        ("/v1/completions", {"model": "red", "prompt": "x", "n": 17}, 400, "n", "less than or equal to 16"),
        ("/v1/completions", {"model": "red", "prompt": "x", "max_tokens": 4000}, 400, "max_tokens", "2048"),
        ("/v1/completions", {"model": "red", "prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "tiny, num, red"),
        ("/v1/chat/completions", {"model": "red", "messages": []}, 400, "messages", "at least 1"),
        (
            "/v1/chat/completions",
            {"model": "red", "messages": [{"role": "user", "content": 5}]},
            400,
            "messages[0].content",
            "string",
        ),
        (
            "/v1/chat/completions",
            {"model": "red", "messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages[0].role",
            "tool",
        ),
        (
            "/v1/chat/completions",
            {"model": "red", "messages": [{"content": "x"}]},
            400,
            "messages[0].role",
            "required",
        ),
    ],
)
def test_bad_requests_get_openai_errors(http: httpx.Client, path, body, status, param, text) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = error_of(http.post(path, headers={"content-type": "application/json"}, **kwargs), status)
    assert err["param"] == param
    assert text in err["message"], err["message"]


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert error_of(http.get("/v1/nothing"), 404)["type"] == "NotFoundError"
    error_of(http.get("/v1/completions"), 405)


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="Available models"):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048"):
        client.completions.create(model="red", prompt="x", max_tokens=5000)
    # A stream that cannot start is a plain HTTP error, which the client raises before iterating.
    with pytest.raises(openai.NotFoundError, match="Available models"):
        client.chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "x"}], stream=True
        )
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="red", prompt="x", temperature=5, stream=True)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"


def test_a_bad_request_does_not_disturb_the_others(running: RunningServer, client: openai.OpenAI) -> None:
    good = [("red", "a ->"), ("num", "b ->")] * 3

    def call_good(job):
        return (
            client.completions.create(model=job[0], prompt=job[1], max_tokens=16, temperature=0)
            .choices[0]
            .text
        )

    def call_bad(i):
        with httpx.Client(base_url=running.url) as h:
            return h.post(
                "/v1/completions", json={"model": "red", "prompt": [1, 10**6], "max_tokens": 3}
            ).status_code

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        goods = [pool.submit(call_good, j) for j in good]
        bads = [pool.submit(call_bad, i) for i in range(3)]
        assert [f.result() for f in bads] == [400] * 3
        assert [f.result() for f in goods] == [PHRASES[m] for m, _ in good]


# ----------------------------------------------------------------------------- adapters at run time


def test_load_and_unload_lora_adapter(
    http: httpx.Client, client: openai.OpenAI, serve_models: ServeModels
) -> None:
    red = str(serve_models.adapters["red"])
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "red2", "lora_path": red})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'red2' added successfully.")
    assert "red2" in {m.id for m in client.models.list().data}
    out = client.completions.create(model="red2", prompt="x ->", max_tokens=16, temperature=0)
    assert out.choices[0].text == PHRASES["red"]

    again = error_of(http.post("/v1/load_lora_adapter", json={"lora_name": "red2", "lora_path": red}), 400)
    assert again["message"] == "The lora adapter 'red2' has already been loaded."
    # load_inplace swaps the weights under the same name (here: the other adapter's).
    num = str(serve_models.adapters["num"])
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "red2", "lora_path": num, "load_inplace": True})
    assert r.status_code == 200
    assert (
        client.completions.create(model="red2", prompt="x ->", max_tokens=16, temperature=0).choices[0].text
        == PHRASES["num"]
    )

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "red2"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'red2' removed successfully.")
    assert "red2" not in {m.id for m in client.models.list().data}
    gone = error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "red2"}), 404)
    assert gone["message"] == "The lora adapter 'red2' cannot be found."
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="red2", prompt="x", max_tokens=2)


def test_load_lora_adapter_errors(http: httpx.Client, serve_models: ServeModels, tmp_path: Path) -> None:
    def load(body):
        return http.post("/v1/load_lora_adapter", json=body)

    assert "Both 'lora_name' and 'lora_path'" in error_of(load({"lora_name": "x"}), 400)["message"]
    assert "is not valid" in error_of(load({"lora_name": "a.b", "lora_path": "/x"}), 400)["message"]
    missing = error_of(load({"lora_name": "ghost", "lora_path": str(tmp_path / "none")}), 404)
    assert "no directory" in missing["message"]
    not_adapter = error_of(load({"lora_name": "whole", "lora_path": str(serve_models.base)}), 400)
    assert "adapter_config.json" in not_adapter["message"] and "base model" in not_adapter["message"]
    assert error_of(http.post("/v1/unload_lora_adapter", json={}), 400)["param"] == "lora_name"
    # Failed loads leave nothing behind: the served set and readiness are unchanged.
    assert http.get("/ready").status_code == 200
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"tiny", "red", "num"}


def test_readiness_waits_for_every_configured_adapter(serve_models: ServeModels, tmp_path: Path) -> None:
    """A configured adapter that cannot load keeps /ready at 503 (naming it) until it is loaded."""
    server = ModelServer(
        base_model=str(serve_models.base),
        adapters={"red": str(serve_models.adapters["red"]), "late": str(tmp_path / "not-there-yet")},
        runtime_adapter_updates=True,
        adapter_roots=[str(serve_models.adapters["num"].parent)],
    )
    with server.start_background() as run, httpx.Client(base_url=run.url, timeout=60) as h:
        assert h.get("/health").json() == {"status": "ok"}  # alive while loading
        server.wait_loaded()
        r = h.get("/ready")
        assert r.status_code == 503
        detail = r.json()
        assert detail["ready"] is False
        assert detail["adapters"]["red"]["loaded"] is True
        assert "not-there-yet" in detail["adapters"]["late"]["error"]
        assert any(m.startswith("adapter late") for m in detail["missing"])
        # The adapter arrives; loading it under its configured name makes the server ready.
        r = h.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "late", "lora_path": str(serve_models.adapters["num"])},
        )
        assert r.status_code == 200, r.text
        assert h.get("/ready").status_code == 200
        # Unloading takes it out of the set the server must serve: still ready.
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
        assert h.get("/ready").status_code == 200
    # After shutdown the engine is gone: health and readiness report it.
    ok, detail = server.readiness()
    assert not ok and "the engine is not running" in detail["missing"]


def test_an_adapter_loading_through_the_api_keeps_the_server_ready(serve_models: ServeModels) -> None:
    """Hot reload: every replica's sidecar loads a new adapter at about the same time, and a load
    waits for the running batch; readiness must not drop meanwhile (the Service would lose the pods)."""
    server = ModelServer(
        base_model=str(serve_models.base),
        base_model_name="tiny",
        runtime_adapter_updates=True,
        adapter_roots=[str(serve_models.adapters["red"].parent)],
    )
    with (
        server.start_background() as run,
        httpx.Client(base_url=run.url, timeout=60) as h,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        wait_ready(run.url)
        gate = threading.Event()
        busy = server.engine.call(gate.wait)  # the worker is busy, as with a long batch
        body = {"lora_name": "red", "lora_path": str(serve_models.adapters["red"])}
        load = pool.submit(httpx.post, f"{run.url}/v1/load_lora_adapter", json=body, timeout=60)
        try:
            eventually(lambda: "red" in server.adapters, what="the load to start")
            assert not load.done()
            r = h.get("/ready")
            assert r.status_code == 200, r.json()
            assert "red" not in {m["id"] for m in h.get("/v1/models").json()["data"]}  # not served yet
        finally:
            gate.set()
        busy.result(10)
        assert load.result(60).status_code == 200
        assert h.get("/ready").status_code == 200
        assert "red" in {m["id"] for m in h.get("/v1/models").json()["data"]}


def test_client_disconnect_mid_stream(running: RunningServer, http: httpx.Client) -> None:
    before = metrics(http)
    body = {"model": "tiny", "prompt": "a ->", "max_tokens": 1500, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=running.url, timeout=60) as h,
        h.stream("POST", "/v1/completions", json=body) as r,
    ):
        next(r.iter_lines())  # the first chunk arrived; now hang up
    t0 = time.monotonic()
    assert (
        http.post(
            "/v1/completions", json={"model": "red", "prompt": "a ->", "max_tokens": 16, "temperature": 0}
        ).json()["choices"][0]["text"]
        == PHRASES["red"]
    )
    assert time.monotonic() - t0 < 30  # the abandoned 1500-token row did not hold the server
    eventually(
        lambda: (
            metric(
                metrics(http),
                "kubetune_serve_requests_total",
                model="tiny",
                endpoint="/v1/completions",
                status="499",
            )
            > metric(
                before,
                "kubetune_serve_requests_total",
                model="tiny",
                endpoint="/v1/completions",
                status="499",
            )
        ),
        what="the disconnect to be counted",
    )
