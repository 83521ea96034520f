"""bench/train_throughput: TRL's rows train on kubetune's exact tokens, configured as documented,
and the report compares kubetune with TRL's best row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput" / "run.py"

pytest.importorskip("trl", reason="TRL is a dev dependency (pyproject extra 'dev')")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kt_bench_train_throughput_trl", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(bench, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("bench-trl")
    data = work / "train.jsonl"
    bench.make_dataset(data, 24, seed=0)
    p = {"batch": 4, "steps": 2, "warmup": 1, "max_len": 256, "packed_rows": 1}
    return work, data, p


def _kubetune_labels(tiny_model_dir: Path, data: Path, max_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from kubetune_trainer.data import DataOptions, DataSource, prepare_datasets

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = prepare_datasets(
        tok, [DataSource(str(data))], DataOptions(max_seq_length=max_len, dedupe="none", seed=0)
    ).train
    return [list(train[i]["labels"]) for i in range(len(train))]


def test_trl_trains_on_kubetunes_tokens_with_the_prompt_masked(bench, setup, tiny_model_dir: Path):
    work, data, p = setup
    trainer = bench.trl_trainer(tiny_model_dir, data, work, p, "fp32", "default")
    expected = _kubetune_labels(tiny_model_dir, data, p["max_len"])
    got = [list(trainer.train_dataset[i]["labels"]) for i in range(len(trainer.train_dataset))]
    assert got == expected
    assert any(label == -100 for label in got[0])  # the prompt is out of the loss
    assert trainer.model.peft_config["default"].r == bench.LORA_R


def test_trl_variants_are_configured_as_documented(bench, setup, tiny_model_dir: Path):
    work, data, p = setup
    default = bench.trl_trainer(tiny_model_dir, data, work, p, "fp32", "default")
    assert default.args.gradient_checkpointing  # TRL's own default, kept in the default row
    grouped = bench.trl_trainer(tiny_model_dir, data, work, p, "fp32", "grouped")
    assert grouped.args.train_sampling_strategy == "group_by_length"
    assert not grouped.args.gradient_checkpointing  # the fast configuration recomputes nothing
    packed = bench.trl_trainer(tiny_model_dir, data, work, p, "fp32", "packed")
    assert packed.args.packing and packed.args.packing_strategy == "bfd"
    assert packed.data_collator.padding_free  # one flattened row per step, position_ids restart
    batch = packed.data_collator([packed.train_dataset[0]])
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= p["max_len"]


def test_trl_row_trains_and_reports_tokens(bench, setup, tiny_model_dir: Path):
    work, data, p = setup
    r = bench.run_trl(tiny_model_dir, data, work, p, "fp32", "grouped")
    assert r["tokens"] > 0 and r["seconds"] > 0 and r["cpu_seconds"] > 0
    assert r["peak_rss_mib"] > 100  # torch and a model are loaded


def test_compare_uses_trls_best_row(bench):
    def row(prec: str, tps: float, rss: float = 1000.0) -> dict:
        return {
            "precision": prec,
            "tokens_per_second": tps,
            "tokens_per_cpu_second": tps / 2,
            "peak_rss_mib": rss,
        }

    results = {
        "baseline": row("bf16", 100),
        "kubetune": row("bf16", 300, rss=900),
        "trl-default": row("bf16", 120),
        "trl-grouped": row("bf16", 200, rss=1200),
        "trl-packed": row("bf16", 50),
        "trl-grouped-fp32": row("fp32", 250),
    }
    ratios = bench.compare(results)
    assert ratios["kubetune / baseline"] == pytest.approx(3.0)
    assert ratios["kubetune / trl-grouped (TRL's best in bf16)"] == pytest.approx(1.5)
    assert ratios["kubetune / trl-grouped-fp32 (TRL's best)"] == pytest.approx(1.2)
    assert ratios["kubetune / trl-grouped-fp32 (TRL's best) [CPU time]"] == pytest.approx(1.2)
    assert ratios["kubetune peak RSS / trl-grouped-fp32 peak RSS"] == pytest.approx(0.9)


def test_rows_cover_every_configuration_in_both_precisions(bench):
    names = [r["name"] for r in bench.rows_for("bf16", cuda=False)]
    for base in ("baseline", "kubetune", "kubetune-packed", "trl-default", "trl-grouped", "trl-packed"):
        assert base in names and f"{base}-fp32" in names
    assert all(not n.endswith("-fp32") for n in (r["name"] for r in bench.rows_for("bf16", cuda=True)))
