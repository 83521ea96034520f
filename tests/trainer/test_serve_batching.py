"""The serving engine: mixed-adapter batches, per-row parameters, isolation of failing rows.

Reference answers come from plain PEFT (``set_adapter`` + ``generate`` one prompt at a time), so
the engine is checked against the library, not against itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kubetune_trainer.serve import ModelServer
from kubetune_trainer.serve.config import BASE_ROW
from kubetune_trainer.serve.decoding import RowText
from kubetune_trainer.serve.rows import Failed, Finished, ModelNotLoadedError, Row, RowEvent, TextDelta
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models, task_prompts

__all__ = ["serve_models"]  # the fixture, imported so pytest sees it


class Collector:
    """A row sink that records events (from the worker thread) and signals completion."""

    def __init__(self) -> None:
        self.events: list[RowEvent] = []
        self.done = threading.Event()

    def __call__(self, event: RowEvent) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    def wait(self) -> RowEvent:
        assert self.done.wait(120), "the row never finished"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def make_server(models: ServeModels, **kw) -> ModelServer:
    # float32 like the one-by-one PEFT reference: these tests check that batching changes no token,
    # which bf16 (dtype auto on CPUs with AMX / AVX-512 BF16) does not promise at the last bit.
    server = ModelServer(
        base_model=str(models.base),
        base_model_name="tiny",
        adapters={n: str(p) for n, p in models.adapters.items()},
        **{"dtype": "float32", **kw},
    )
    server.load()
    return server


def row(server: ModelServer, prompt: str, model: str, **kw) -> tuple[Row, Collector]:
    sink = Collector()
    ids = server.lm.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
    params = {"max_tokens": 12, "temperature": 0.0, **kw}
    return Row(prompt_ids=ids, model=model, sink=sink, **params), sink


def run_one_batch(server: ModelServer, rows: list[Row], sinks: list[Collector] | None = None) -> None:
    """Queue every row before the worker starts, so they are guaranteed to share one batch."""
    assert not server.engine.running
    for r in rows:
        server.engine.submit(r)
    before = server.engine.batches_run
    server.engine.start()
    try:
        for sink in sinks or [r.sink for r in rows]:
            assert sink.done.wait(120)
    finally:
        server.close()
    assert server.engine.batches_run == before + 1


@pytest.fixture(scope="module")
def reference(serve_models: ServeModels):
    """Greedy answers from plain PEFT, one prompt at a time with set_adapter()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serve_models.base)
    base = AutoModelForCausalLM.from_pretrained(serve_models.base).eval()
    names = list(serve_models.adapters)
    peft = PeftModel.from_pretrained(base, str(serve_models.adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(serve_models.adapters[n]), adapter_name=n)
    peft.eval()
    cache: dict[tuple[str, str, int], tuple[int, ...]] = {}

    def answer(prompt: str, model: str, max_tokens: int = 12) -> tuple[int, ...]:
        key = (prompt, model, max_tokens)
        if key not in cache:
            ids = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                if model == BASE_ROW:
                    with peft.disable_adapter():
                        out = peft.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
                else:
                    peft.set_adapter(model)
                    out = peft.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            new = out[0, ids.input_ids.shape[1] :].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            cache[key] = tuple(new)
        return cache[key]

    answer.tokenizer = tok  # type: ignore[attr-defined]
    return answer


@pytest.fixture
def server(serve_models: ServeModels) -> Iterator[ModelServer]:
    s = make_server(serve_models, batch_window_ms=50, max_batch_size=64)
    yield s
    s.close()


def test_each_adapter_answers_with_its_own_task(server: ModelServer) -> None:
    server.engine.start()
    prompt = "the cat ->"
    answers = {m: server.generate(prompt, model=m, max_tokens=12) for m in ("red", "num", "tiny")}
    assert answers["red"] == PHRASES["red"]
    assert answers["num"] == PHRASES["num"]
    assert answers["tiny"] not in PHRASES.values()


def test_mixed_batch_is_token_identical_to_one_by_one(server: ModelServer, reference) -> None:
    prompts = [
        *task_prompts(12, seed=99),
        "a much longer prompt with many words in it so padding matters ->",
        "x",
    ]
    models = ["red", "num", BASE_ROW]
    rows = [row(server, p, models[i % 3]) for i, p in enumerate(prompts)]
    run_one_batch(server, [r for r, _ in rows])
    sizes = {s.name: s.value for s in server.metrics.batch_size.collect()[0].samples}
    assert (sizes["kubetune_serve_batch_size_count"], sizes["kubetune_serve_batch_size_sum"]) == (
        1,
        len(rows),
    )
    for (r, sink), prompt in zip(rows, prompts, strict=True):
        event = sink.wait()
        assert isinstance(event, Finished), event
        assert event.token_ids == reference(prompt, r.model), f"{r.model}: {prompt!r}"
        assert sink.text == reference.tokenizer.decode(event.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("scheduling", ["static", "per_adapter", "sequential"])
def test_baseline_schedulings_give_the_same_answers(
    serve_models: ServeModels, reference, scheduling: str
) -> None:
    s = make_server(serve_models, scheduling=scheduling)
    prompts = task_prompts(6, seed=5)
    rows = [row(s, p, ["num", BASE_ROW, "red"][i % 3]) for i, p in enumerate(prompts)]
    run_one_batch(s, [r for r, _ in rows])
    for (r, sink), prompt in zip(rows, prompts, strict=True):
        event = sink.wait()
        assert isinstance(event, Finished)
        assert event.token_ids == reference(prompt, r.model)


def test_a_failing_row_fails_alone(server: ModelServer, reference) -> None:
    vocab = server.lm.vocab_size
    good1, s1 = row(server, "the dog ->", "red")
    bad, s_bad = row(server, [1, 5, vocab + 10], "num")  # an id the embedding cannot look up
    good2, s2 = row(server, "one apple ->", "num")
    run_one_batch(server, [good1, bad, good2])
    failed = s_bad.wait()
    assert isinstance(failed, Failed)
    assert "index" in str(failed.error).lower() or "range" in str(failed.error).lower()
    for r, s, prompt in ((good1, s1, "the dog ->"), (good2, s2, "one apple ->")):
        event = s.wait()
        assert isinstance(event, Finished)
        assert event.token_ids == reference(prompt, r.model)
    failures = {
        sample.labels["model"]: sample.value
        for sample in server.metrics.row_failures.collect()[0].samples
        if sample.name.endswith("_total")
    }
    assert failures == {"num": 1.0}


def test_rows_of_an_unloaded_adapter_fail_alone(server: ModelServer) -> None:
    keep, s_keep = row(server, "the sun ->", "red")
    gone, s_gone = row(server, "the sun ->", "num")
    for r in (keep, gone):
        server.engine.submit(r)
    server.unload_adapter("num")  # between queueing and the batch
    server.engine.start()
    assert isinstance(s_gone.wait(), Failed)
    assert isinstance(s_gone.events[-1].error, ModelNotLoadedError)
    assert isinstance(s_keep.wait(), Finished)
    assert s_keep.text == PHRASES["red"]


def test_sampling_is_per_row_and_seeded(server: ModelServer, reference) -> None:
    prompt = "blue moon ->"
    seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 16}
    alone, s_alone = row(server, prompt, BASE_ROW, **seeded)
    run_one_batch(server, [alone])

    server2 = make_server_like(server)
    in_batch, s_batch = row(server2, prompt, BASE_ROW, **seeded)
    other_seed, s_other = row(server2, prompt, BASE_ROW, **{**seeded, "seed": 4321})
    greedy, s_greedy = row(server2, prompt, "num")
    hot, s_hot = row(server2, "the tree ->", "red", temperature=1.5)
    run_one_batch(server2, [hot, in_batch, greedy, other_seed])

    same_seed = s_alone.wait(), s_batch.wait()
    assert all(isinstance(e, Finished) for e in same_seed)
    # The same seed gives the same tokens whatever else shares the batch.
    assert same_seed[0].token_ids == same_seed[1].token_ids
    assert s_other.wait().token_ids != same_seed[0].token_ids
    # A greedy row is unaffected by sampling rows next to it.
    assert s_greedy.wait().token_ids == reference(prompt, "num")
    assert isinstance(s_hot.wait(), Finished)


def make_server_like(server: ModelServer) -> ModelServer:
    s = ModelServer(server.config)
    s.load()
    return s


def test_stop_strings_max_tokens_and_eos_per_row(server: ModelServer) -> None:
    stop, s_stop = row(server, "the cat ->", "red", stop=(" cat",))
    short, s_short = row(server, "the cat ->", "red", max_tokens=2)
    eos, s_eos = row(server, "the cat ->", "red", max_tokens=40)
    no_eos, s_no_eos = row(server, "the cat ->", "red", max_tokens=20, ignore_eos=True)
    # min_tokens (vLLM's meaning): EOS is masked and stop strings wait until 30 tokens are out.
    at_least, s_at_least = row(server, "the cat ->", "red", max_tokens=40, min_tokens=30, stop=(" cat",))
    run_one_batch(server, [stop, short, eos, no_eos, at_least])
    assert (s_stop.wait().reason, s_stop.text) == ("stop", " red")
    assert (s_short.wait().reason, s_short.wait().completion_tokens) == ("length", 2)
    assert (s_eos.wait().reason, s_eos.text) == ("stop", PHRASES["red"])
    # ignore_eos (benchmarks): runs on past the EOS the other row stopped at, to max_tokens.
    assert (s_no_eos.wait().reason, s_no_eos.wait().completion_tokens) == ("length", 20)
    assert s_no_eos.text.startswith(PHRASES["red"]) and len(s_no_eos.wait().token_ids) == 20
    assert s_eos.wait().completion_tokens < 30
    assert s_at_least.wait().completion_tokens >= 30 and s_at_least.text.startswith(" red")
    assert not set(s_at_least.wait().token_ids[:30]) & set(server.lm.eos_ids)


def test_a_row_that_stops_early_is_delivered_before_the_batch_ends(server: ModelServer) -> None:
    order: list[str] = []
    lock = threading.Lock()

    def tagged(name: str, sink: Collector):
        def f(event: RowEvent) -> None:
            with lock:
                if isinstance(event, Finished):
                    order.append(name)
            sink(event)

        return f

    short, s_short = row(server, "the cat ->", "red", max_tokens=3)
    long, s_long = row(server, "the cat ->", BASE_ROW, max_tokens=60)
    short.sink, long.sink = tagged("short", s_short), tagged("long", s_long)
    run_one_batch(server, [long, short], [s_long, s_short])
    assert order == ["short", "long"]
    # Streaming: the long row's text arrived in many pieces, not at the end.
    assert sum(isinstance(e, TextDelta) for e in s_long.events) > 10


def test_stop_string_split_across_tokens_is_never_streamed(serve_models: ServeModels) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serve_models.base)
    chunks: list[str] = []
    r = Row(prompt_ids=tok("x").input_ids, model="red", max_tokens=50, sink=lambda e: None, stop=("cat re",))
    text = RowText(r, tok, frozenset({tok.eos_token_id}))
    for token in tok(" red cat red cat", add_special_tokens=False).input_ids:
        text.add(token)
        chunks.append(text.deliverable())
        if text.finished:
            break
    assert text.finish_reason == "stop"
    # Text that turned out to start the stop string was held back, never sent.
    assert "".join(chunks) == " red "
    assert len([c for c in chunks if c]) > 1  # and the rest was streamed as it came


def test_cancelled_rows_are_dropped(server: ModelServer) -> None:
    r, sink = row(server, "the cat ->", "red")
    r.cancelled = True  # the client went away while the row was queued
    other, s_other = row(server, "the cat ->", "num")
    for x in (r, other):
        server.engine.submit(x)
    server.engine.start()
    assert isinstance(s_other.wait(), Finished)
    assert sink.events == []


def test_load_model_follows_the_guide(serve_models: ServeModels, tmp_path: Path) -> None:
    """Guide style: configure nothing, load_model(name, path) for the base and each adapter."""
    s = ModelServer()
    s.load_model("tiny", str(serve_models.base))
    s.load_model("red", str(serve_models.adapters["red"]))
    s.set_adapter("red")
    try:
        assert s.model_names() == ["tiny", "red"]
        assert s.generate("the cat ->", max_tokens=12) == PHRASES["red"]  # the default model
        with pytest.raises(KeyError, match="not loaded; loaded: tiny, red"):
            s.set_adapter("nope")
        with pytest.raises(ValueError, match="already loaded"):
            s.load_model("other-base", str(serve_models.base))
    finally:
        s.close()
    # Without a base model configured, the adapter's adapter_config.json names it.
    s2 = ModelServer()
    s2.load_model("num", str(serve_models.adapters["num"]))
    try:
        assert s2.base_name == Path(serve_models.base).name
        assert s2.generate("the cat ->", model="num", max_tokens=12) == PHRASES["num"]
    finally:
        s2.close()
