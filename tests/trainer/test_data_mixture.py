"""Multi-task mixtures (weights = share of the training set) and replay for continual learning."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from kubetune_trainer.data import DataOptions, DataSource, prepare_datasets
from kubetune_trainer.data.mixture import mix, mixture_counts
from kubetune_trainer.data.replay import add_replay, replay_count
from kubetune_trainer.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def task_file(tmp_path, name, n):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(
        "\n".join(json.dumps({"instruction": f"{name} task {i}", "output": f"{name} {i}"}) for i in range(n))
    )
    return str(path)


def test_mixture_counts_split_the_total_by_weight():
    assert mixture_counts([100, 100], [1, 1]) == [100, 100]
    assert mixture_counts([300, 100], [1, 3]) == [100, 300]  # the small task is upsampled 3x
    assert mixture_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    counts = mixture_counts([7, 5, 3], [0.5, 0.3, 0.2])
    assert sum(counts) == 15 and counts == [8, 4, 3]  # largest remainder keeps the total exact


def test_mix_is_deterministic_and_upsamples_whole_copies_first():
    a, b = [f"a{i}" for i in range(6)], [f"b{i}" for i in range(2)]
    mixed, counts = mix([a, b], [1, 1], seed=3)
    assert counts == [4, 4] and mix([a, b], [1, 1], seed=3) == (mixed, counts)
    by_item = Counter(mixed)
    assert by_item["b0"] == by_item["b1"] == 2  # the small source is repeated evenly
    assert sum(by_item[x] for x in a) == 4 and max(by_item[x] for x in a) == 1  # subsampled without repeats
    assert mix([a, b], [1, 1], seed=4)[0] != mixed


def test_prepared_mixture_proportions(tokenizer, tmp_path):
    qa, math = task_file(tmp_path, "qa", 300), task_file(tmp_path, "math", 100)
    data = prepare_datasets(
        tokenizer, [DataSource(qa, weight=0.25), DataSource(math, weight=0.75)], DataOptions(seed=11)
    )
    sources = Counter(ex.source for ex in data.train.examples)
    assert len(data.train) == 400
    assert sources[math] / 400 == pytest.approx(0.75, abs=0.01)
    assert (data.stats.source(qa).used, data.stats.source(math).used) == (100, 300)
    # Deterministic by seed; the order is shuffled (not one task after the other).
    again = prepare_datasets(
        tokenizer, [DataSource(qa, weight=0.25), DataSource(math, weight=0.75)], DataOptions(seed=11)
    )
    assert [e.key for e in again.train.examples] == [e.key for e in data.train.examples]
    first_half = Counter(ex.source for ex in data.train.examples[:200])
    assert 100 < first_half[math] < 200


def test_replay_fraction_is_the_share_of_the_training_set(tokenizer, tmp_path):
    new, old = task_file(tmp_path, "new", 150), task_file(tmp_path, "old", 30)
    data = prepare_datasets(
        tokenizer, [DataSource(new)], DataOptions(replay_fraction=0.25), replay=DataSource(old)
    )
    sources = Counter(ex.source for ex in data.train.examples)
    assert sources == {new: 150, old: 50}  # 50 of 200 = 25% replay; the 30 old ones are repeated
    assert data.stats.replay_examples == 50 and data.stats.source(old, "replay").used == 50
    assert data.stats.train_examples == 200
    assert data.replay is not None and len(data.replay) == 30  # all of the old task, e.g. for EWC


def test_replay_count_rounds_to_the_requested_share():
    assert replay_count(1000, 0.2) == 250  # 250 / 1250 = 20%
    assert replay_count(100, 0.5) == 100
    assert replay_count(7, 0.0) == 0
    with pytest.raises(ValueError, match="replay_fraction must be in"):
        replay_count(10, 1.0)


def test_replay_is_deterministic_and_sampled_without_repeats_when_possible():
    train, replay = list(range(90)), [f"r{i}" for i in range(100)]
    mixed, added = add_replay(train, replay, 0.1, seed=1)
    assert added == 10 and add_replay(train, replay, 0.1, seed=1) == (mixed, added)
    picked = [x for x in mixed if isinstance(x, str)]
    assert len(set(picked)) == 10


def test_replay_settings_must_agree(tokenizer, tmp_path):
    new = task_file(tmp_path, "new", 5)
    with pytest.raises(ValueError, match="no replay source"):
        prepare_datasets(tokenizer, [DataSource(new)], DataOptions(replay_fraction=0.5))
    with pytest.raises(ValueError, match="replay_fraction is 0"):
        prepare_datasets(tokenizer, [DataSource(new)], DataOptions(), replay=DataSource(new))
