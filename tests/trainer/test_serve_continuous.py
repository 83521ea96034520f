"""Continuous batching: rows join the running batch between steps and leave it when they end.

Reference answers come from plain PEFT ``generate()`` one prompt at a time (the ``reference``
fixture of test_serve_batching), so a row that joined a batch already running, next to rows of
other adapters and of other lengths, is checked against the library, token for token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from kubetune_trainer.serve import ModelServer
from kubetune_trainer.serve.config import BASE_ROW
from kubetune_trainer.serve.continuous import RunningBatch
from kubetune_trainer.serve.rows import Failed, Finished, ModelNotLoadedError, Row, TextDelta
from tests.trainer.serve_fixtures import PHRASES, ServeModels, serve_models
from tests.trainer.test_serve_batching import Collector, make_server, reference, row

__all__ = ["reference", "serve_models"]  # fixtures, imported so pytest sees them


def wait_for_text(sink: Collector, pieces: int, timeout: float = 60) -> None:
    """Until the row has streamed ``pieces`` text deltas (it is running, mid-generation)."""
    deadline = time.monotonic() + timeout
    while sum(isinstance(e, TextDelta) for e in sink.events) < pieces:
        assert time.monotonic() < deadline, "the row never started streaming"
        assert not sink.done.is_set(), "the row ended before the test could join it"
        time.sleep(0.005)


def step_sizes(server: ModelServer) -> dict[float, float]:
    """Cumulative bucket counts of the step batch-size histogram: {upper bound: steps}."""
    return {
        float(s.labels["le"]): s.value
        for s in server.metrics.step_batch_size.collect()[0].samples
        if s.name.endswith("_bucket")
    }


@pytest.fixture
def server(serve_models: ServeModels) -> Iterator[ModelServer]:
    s = make_server(serve_models, max_batch_size=8)
    s.engine.start()
    yield s
    s.close()


def test_a_short_request_joins_a_running_batch_and_ends_first(server: ModelServer, reference) -> None:
    order: list[str] = []
    long, s_long = row(server, "a long answer ->", BASE_ROW, max_tokens=300, ignore_eos=True)
    short, s_short = row(server, "the cat ->", "red", max_tokens=12)
    for r, name in ((long, "long"), (short, "short")):
        sink = r.sink
        r.sink = lambda e, sink=sink, name=name: (
            order.append(name) if isinstance(e, Finished) else None,
            sink(e),
        )
    server.engine.submit(long)
    wait_for_text(s_long, 3)
    server.engine.submit(short)
    end_short = s_short.wait()
    assert not s_long.done.is_set(), "the short request waited for the long one"
    end_long = s_long.wait()
    assert order == ["short", "long"]
    assert isinstance(end_short, Finished) and isinstance(end_long, Finished)
    # It joined mid-run (two prefills), shared steps with the long row, and its tokens are still
    # exactly plain PEFT's, though its cache was left-padded to the long row's width.
    assert server.engine.batches_run == 2
    sizes = step_sizes(server)
    assert sizes[1.0] < sizes[2.0], "no step ran both rows"
    assert end_short.token_ids == reference("the cat ->", "red")
    assert s_short.text == PHRASES["red"]
    assert end_long.completion_tokens == 300 and end_long.reason == "length"


def test_rows_leave_at_eos_stop_and_max_tokens_and_the_cache_shrinks(
    serve_models: ServeModels, reference
) -> None:
    s = make_server(serve_models)
    try:
        eos, s_eos = row(s, "the cat ->", "red", max_tokens=40)  # ends at EOS after its phrase
        stop, s_stop = row(s, "one apple ->", "num", max_tokens=40, stop=(" three",))
        wide, s_wide = row(s, "a much longer prompt with many more words in it ->", BASE_ROW, max_tokens=3)
        length, s_length = row(s, "x ->", BASE_ROW, max_tokens=30, ignore_eos=True)
        batch = RunningBatch(s.lm)
        batch.prefill([eos, stop, wide, length])
        sizes, widths = [len(batch)], [batch.mask.shape[1]]
        while len(batch):
            batch.step()
            sizes.append(len(batch))
            widths.append(batch.mask.shape[1])
            if len(batch):  # cache, mask and rows stay aligned as rows leave
                keys = batch.cache.layers[0].keys
                assert (keys.shape[0], keys.shape[2]) == (len(batch), batch.mask.shape[1])
        batch.release()
    finally:
        s.close()
    assert (s_eos.wait().reason, s_eos.text) == ("stop", PHRASES["red"])
    assert s_eos.events[-1].token_ids == reference("the cat ->", "red", 40)
    assert (s_stop.wait().reason, s_stop.text) == ("stop", " one two")
    assert (s_wide.wait().reason, s_wide.wait().completion_tokens) == ("length", 3)
    assert (s_length.wait().reason, s_length.wait().completion_tokens) == ("length", 30)
    # Each row left on the step it ended; the last one ran alone to its 30th token.
    assert sizes[0] == 4 and sizes[-1] == 0 and sizes == sorted(sizes, reverse=True)
    assert sizes.count(1) > 10
    # Alone, the short-prompt row's cache holds no padding column any more (the wide prompt's
    # padding was cut off): its prompt plus the tokens it has fed back.
    alone = sizes.index(1)
    assert widths[alone] == len(length.prompt_ids) + alone < widths[0] + alone


def test_adapters_mix_in_one_step(serve_models: ServeModels, reference) -> None:
    server = make_server(serve_models)
    prompts = ["the dog ->", "two cars ->", "blue moon ->", "the sun ->"]
    models = ["red", "num", BASE_ROW, "num"]
    rows = [row(server, p, m) for p, m in zip(prompts, models, strict=True)]
    for r, _ in rows:  # queued before the worker starts: they start together
        server.engine.submit(r)
    server.engine.start()
    try:
        _check_mixed(server, rows, prompts, reference)
    finally:
        server.close()


def _check_mixed(server: ModelServer, rows, prompts, reference) -> None:
    for (r, sink), prompt in zip(rows, prompts, strict=True):
        event = sink.wait()
        assert isinstance(event, Finished)
        assert event.token_ids == reference(prompt, r.model)
    sizes = step_sizes(server)
    assert sizes[4.0] - sizes[2.0] > 0, "no step ran all four rows (three models) together"
    models_seen = {s.labels["model"] for s in server.metrics.batch_rows.collect()[0].samples}
    assert {"red", "num", "tiny"} <= models_seen


def test_cancelling_a_running_row_frees_its_slot(serve_models: ServeModels) -> None:
    s = make_server(serve_models, max_batch_size=1)
    s.engine.start()
    try:
        first, s_first = row(s, "the cat ->", BASE_ROW, max_tokens=1900, ignore_eos=True)
        waiting, s_waiting = row(s, "the cat ->", "red")
        s.engine.submit(first)
        wait_for_text(s_first, 3)
        s.engine.submit(waiting)
        time.sleep(0.3)
        assert not s_waiting.done.is_set(), "the second row started although the only slot was taken"
        first.cancelled = True  # the client went away
        assert isinstance(s_waiting.wait(), Finished)
        assert s_waiting.text == PHRASES["red"]
        # The cancelled row stopped generating and was never answered.
        assert not any(isinstance(e, Finished | Failed) for e in s_first.events)
        assert sum(isinstance(e, TextDelta) for e in s_first.events) < 1900
    finally:
        s.close()


def test_a_failing_row_that_joins_fails_alone(server: ModelServer, reference) -> None:
    long, s_long = row(server, "one apple ->", "num", max_tokens=200, ignore_eos=True)
    server.engine.submit(long)
    wait_for_text(s_long, 2)
    vocab = server.lm.vocab_size
    bad, s_bad = row(server, [1, 5, vocab + 10], "red")  # an id the embedding cannot look up
    good, s_good = row(server, "the dog ->", "red")
    for r in (bad, good):
        server.engine.submit(r)
    assert isinstance(s_bad.wait(), Failed)
    assert isinstance(s_good.wait(), Finished)
    assert s_good.events[-1].token_ids == reference("the dog ->", "red")
    end_long = s_long.wait()
    assert isinstance(end_long, Finished) and end_long.completion_tokens == 200
    assert end_long.token_ids[:4] == reference("one apple ->", "num")[:4]


def test_unloading_an_adapter_ends_only_its_running_rows(server: ModelServer) -> None:
    gone, s_gone = row(server, "the cat ->", "num", max_tokens=1900, ignore_eos=True)
    keep, s_keep = row(server, "the cat ->", "red", max_tokens=300, ignore_eos=True)
    for r in (gone, keep):
        server.engine.submit(r)
    wait_for_text(s_gone, 2)
    unloaded = threading.Thread(target=server.unload_adapter, args=("num",))
    unloaded.start()
    unloaded.join(60)
    failed = s_gone.wait()
    assert isinstance(failed, Failed) and isinstance(failed.error, ModelNotLoadedError)
    end = s_keep.wait()
    assert isinstance(end, Finished) and end.completion_tokens == 300
    assert s_keep.text.startswith(PHRASES["red"])


def test_a_model_whose_cache_cannot_be_split_per_row_is_refused_with_the_fix(
    serve_models: ServeModels,
) -> None:
    """Sliding-window layers drop old positions themselves: their requests fail and say what to set."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from kubetune_trainer.serve.engine import Engine
    from kubetune_trainer.serve.model import LoadedModel

    config = MistralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    tok = AutoTokenizer.from_pretrained(serve_models.base)
    engine = Engine()
    engine.lm = LoadedModel(
        MistralForCausalLM(config).eval(), tok, device=torch.device("cpu"), max_model_len=64
    )
    sink = Collector()
    engine.submit(Row(prompt_ids=tok("the cat ->").input_ids, model=BASE_ROW, max_tokens=4, sink=sink))
    engine.start()
    try:
        failed = sink.wait()
    finally:
        engine.stop()
    assert isinstance(failed, Failed)
    assert "scheduling: static" in str(failed.error) and "sliding-window" in str(failed.error)
