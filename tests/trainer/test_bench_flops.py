"""bench/train_throughput: the MFU's model-FLOPs formula against FLOPs counted by torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kt_bench_train_throughput", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_flops_per_token_matches_a_counted_forward_and_backward(bench, tmp_path: Path) -> None:
    from kubetune_trainer.tiny_model import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    seq = 256
    est = bench.lora_flops_per_token(model, [seq])
    embed = model.get_input_embeddings().weight.numel()
    assert est["non_embedding_params"] == est["params"] - embed  # the input table does no matmul
    assert est["attention_flops_per_token"] == 12 * 2 * 4 * 32 * seq  # 12·L·H·Q·T

    peft_model = get_peft_model(
        model, LoraConfig(r=bench.LORA_R, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    assert est["lora_params"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        peft_model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / seq
    # Within 5%: autograd also skips the activation gradients of the first layer's frozen inputs.
    assert counted == pytest.approx(est["flops_per_token"], rel=0.05)


def test_attention_term_uses_the_length_spread(bench, tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    even = bench.lora_flops_per_token(model, [100, 100])
    spread = bench.lora_flops_per_token(model, [20, 180])  # same tokens, more attention work
    assert even["t_eff"] == 100 and spread["t_eff"] == pytest.approx((20**2 + 180**2) / 200)
    assert spread["attention_flops_per_token"] > even["attention_flops_per_token"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_peak_reports_the_best_size(bench, monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    peak = bench.measure_matmul_peak(dtype, sizes=(64, 128), repeats=2)
    assert set(peak["per_size"]) == {64, 128}
    assert peak["tflops"] == max(peak["per_size"].values()) == peak["per_size"][peak["size"]] > 0
    assert peak["threads"] == torch.get_num_threads()


def test_rounds_report_the_median_row_and_the_best_peak(bench) -> None:
    rounds = [{"tokens_per_second": t, "round": i} for i, t in enumerate([900.0, 1500.0, 1000.0])]
    median = bench.median_round(rounds)
    assert (median["tokens_per_second"], median["round"]) == (1000.0, 2)
    assert median["tokens_per_second_rounds"] == [900.0, 1500.0, 1000.0]
    assert bench.median_round(rounds[:2])["tokens_per_second"] == 900.0  # even count: the lower middle
    assert bench.median_round(rounds[:1])["tokens_per_second"] == 900.0
    peak = bench.best_peak([{"tflops": 1.0, "size": 2048}, {"tflops": 2.5, "size": 4096}])
    assert (peak["tflops"], peak["size"], peak["rounds"]) == (2.5, 4096, [1.0, 2.5])


def test_round_ratios_compare_kubetune_with_trls_best_of_the_same_round(bench) -> None:
    def rounds(*tps: float) -> list[dict[str, float]]:
        return [{"tokens_per_second": t} for t in tps]

    runs = {
        "kubetune": rounds(300.0, 200.0),
        "trl-grouped": rounds(100.0, 200.0),
        "trl-grouped-fp32": rounds(150.0, 50.0),
        "baseline": rounds(1.0, 1.0),
    }
    assert bench.round_ratios(runs) == [2.0, 1.0]
    assert bench.round_ratios({"kubetune": rounds(1.0)}) == []
