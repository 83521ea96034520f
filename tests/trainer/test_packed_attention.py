"""packed_sdpa: variable-length attention for packed rows without flash-attention.

It must compute exactly what transformers' block-diagonal sdpa mask computes (forward and
gradients), fall back to plain sdpa where a batch has no example boundaries, be what a packed
training run loads on CPU, and leave the loss curve of a training run where it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune_trainer import FinetuningConfig
from kubetune_trainer.data import IGNORE_INDEX, make_collator
from kubetune_trainer.methods import model_load_kwargs
from kubetune_trainer.packed_attention import PACKED_SDPA, packing_attention, register
from kubetune_trainer.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_llama(vocab_size: int, attn: str) -> LlamaForCausalLM:
    register()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    return model


def features(tokenizer) -> list[dict[str, list[int]]]:
    texts = [
        "the cat sat on the red house",
        "one two three",
        "a dog and a bird play in the garden all day",
        "yes",
    ]
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        labels = [IGNORE_INDEX] * 2 + ids[2:] if i % 2 == 0 else list(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_collator_passes_the_example_boundaries(tokenizer):
    feats = features(tokenizer)
    batch = make_collator(tokenizer, packing=True)(feats)
    ends = torch.tensor([len(f["input_ids"]) for f in feats]).cumsum(0).tolist()
    assert batch["cu_seq_lens_q"].tolist() == [0, *ends]
    assert batch["max_length_q"] == max(len(f["input_ids"]) for f in feats)


def test_packed_sdpa_matches_masked_sdpa_in_loss_and_gradients(tokenizer):
    feats = features(tokenizer)
    batch = make_collator(tokenizer, packing=True)(feats)
    results = {}
    for attn in ("sdpa", PACKED_SDPA):
        model = tiny_llama(len(tokenizer), attn).train()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[attn] = (loss.detach(), grads)
    torch.testing.assert_close(results[PACKED_SDPA][0], results["sdpa"][0], atol=1e-6, rtol=1e-5)
    assert results[PACKED_SDPA][1].keys() == results["sdpa"][1].keys()
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results[PACKED_SDPA][1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_sdpa_logits_equal_each_example_alone(tokenizer):
    model = tiny_llama(len(tokenizer), PACKED_SDPA).eval()
    feats = features(tokenizer)
    batch = make_collator(tokenizer, packing=True)(feats)
    with torch.no_grad():
        packed = model(**batch).logits[0]  # with the default KV cache too: the boundaries decide
        start = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    # Negative control: without the boundaries the same row attends across examples.
    with torch.no_grad():
        row = model(input_ids=batch["input_ids"]).logits[0]
    n0, n1 = (len(f["input_ids"]) for f in feats[:2])
    assert not torch.allclose(row[n0 : n0 + n1], packed[n0 : n0 + n1], atol=1e-3)


def test_padded_batches_and_generation_fall_back_to_sdpa(tokenizer):
    feats = features(tokenizer)
    padded = make_collator(tokenizer, packing=False)(feats)
    with torch.no_grad():
        ours = tiny_llama(len(tokenizer), PACKED_SDPA).eval()
        ref = tiny_llama(len(tokenizer), "sdpa").eval()
        torch.testing.assert_close(ours(**padded).logits, ref(**padded).logits)
        prompt = torch.tensor([feats[0]["input_ids"]])
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert ours.generate(prompt, **kw).tolist() == ref.generate(prompt, **kw).tolist()


def test_packed_training_loads_packed_sdpa_on_cpu_unless_the_user_chose(tiny_model_dir: Path):
    def cfg(**kw) -> FinetuningConfig:
        return FinetuningConfig(model_name=str(tiny_model_dir), train_file="x.jsonl", **kw)

    assert model_load_kwargs(cfg(packing=True), "fp32")["attn_implementation"] == PACKED_SDPA
    assert "attn_implementation" not in model_load_kwargs(cfg(packing=False), "fp32")
    if not torch.cuda.is_available():  # unpacked bf16 on CPU: for the kernel choice of short batches
        assert model_load_kwargs(cfg(packing=False), "bf16")["attn_implementation"] == PACKED_SDPA
    chosen = model_load_kwargs(cfg(packing=True, attn_implementation="eager"), "fp32")
    assert chosen["attn_implementation"] == "eager"
    assert packing_attention(None, "cpu") == PACKED_SDPA
    assert packing_attention("flex_attention", "cuda") == "flex_attention"


def test_short_bf16_sequences_take_the_math_kernel_with_the_same_result(tokenizer):
    from kubetune_trainer.packed_attention import SHORT_BF16_CPU

    feats = features(tokenizer)
    assert max(len(f["input_ids"]) for f in feats) < SHORT_BF16_CPU
    padded = make_collator(tokenizer, packing=False)(feats)
    with torch.no_grad():
        ours = tiny_llama(len(tokenizer), PACKED_SDPA).to(torch.bfloat16).eval()
        ref = tiny_llama(len(tokenizer), "sdpa").to(torch.bfloat16).eval()
        # bf16 rounding differs between kernels; the logits agree to bf16 precision.
        torch.testing.assert_close(ours(**padded).logits, ref(**padded).logits, atol=0.05, rtol=0.02)


def test_packing_keeps_the_loss_curve(lora_losses):
    # group_by_length off: the same random batches with and without packing
    padded, _ = lora_losses("padded", packing=False, group_by_length=False)
    packed, ft = lora_losses("packed", packing=True, group_by_length=False)
    assert ft.model.config._attn_implementation == PACKED_SDPA
    assert len(packed) == len(padded) == 8
    assert padded[-1] < padded[0]  # it learns, so equal curves are not two flat lines
    # Same examples, same order, same seed: the same curve up to float rounding.
    assert packed == pytest.approx(padded, rel=2e-3, abs=2e-3)


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(tokens: int, head_dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(tokens + head_dim)
    shapes = [(2, 4, tokens, head_dim), (2, 2, tokens, head_dim), (2, 2, tokens, head_dim)]
    return [(torch.randn(s, generator=g) * 1.5).to(torch.bfloat16).requires_grad_() for s in shapes]


def test_small_heads_train_with_an_fp32_backward_at_least_as_accurate(monkeypatch):
    from kubetune_trainer import packed_attention as pa
    from kubetune_trainer.packed_attention import CausalFlashFp32Backward, packed_sdpa_forward

    monkeypatch.setattr(pa, "_own_kernel_applies", lambda query: False)  # a CPU without AMX
    calls = []
    original = CausalFlashFp32Backward.apply
    monkeypatch.setattr(CausalFlashFp32Backward, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    q, k, v = _qkv(pa.SHORT_BF16_CPU + 8, 16)
    grad_out = torch.randn(2, q.shape[2], 4, 16, generator=torch.Generator().manual_seed(1)).to(
        torch.bfloat16
    )

    ours, _ = packed_sdpa_forward(_Attention(), q, k, v, None, dropout=0.0, scaling=0.25)
    assert calls == [q.shape]
    ours.backward(grad_out)
    ours_grads = [t.grad for t in (q, k, v)]
    # torch's flash kernel, bf16 forward and backward: the same forward, the backward it replaces
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    flash = torch.nn.functional.scaled_dot_product_attention(
        q2, k2, v2, is_causal=True, scale=0.25, enable_gqa=True
    )
    assert torch.equal(ours, flash.transpose(1, 2))
    flash.transpose(1, 2).backward(grad_out)
    # fp64 reference
    q3, k3, v3 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q3, k3, v3, is_causal=True, scale=0.25, enable_gqa=True
    )
    ref.transpose(1, 2).backward(grad_out.double())
    for mine, theirs, exact in zip(
        ours_grads, (q2.grad, k2.grad, v2.grad), (q3.grad, k3.grad, v3.grad), strict=True
    ):
        assert mine.dtype == torch.bfloat16

        def rel(x: torch.Tensor, ex: torch.Tensor = exact) -> float:
            return ((x.double() - ex).norm() / ex.norm()).item()

        assert rel(mine) <= rel(theirs) * 1.05 + 1e-4


@pytest.mark.parametrize(
    "case",
    ["no_grad", "mask", "large_heads", "short", "fp32"],
)
def test_the_fp32_backward_only_where_it_was_measured_faster(monkeypatch, case):
    from kubetune_trainer import packed_attention as pa
    from kubetune_trainer.packed_attention import CausalFlashFp32Backward, packed_sdpa_forward

    monkeypatch.setattr(pa, "_own_kernel_applies", lambda query: False)  # a CPU without AMX
    calls = []
    original = CausalFlashFp32Backward.apply
    monkeypatch.setattr(CausalFlashFp32Backward, "apply", lambda *a: calls.append(1) or original(*a))
    tokens = 64 if case == "short" else pa.SHORT_BF16_CPU
    q, k, v = _qkv(tokens, 64 if case == "large_heads" else 16)
    if case == "fp32":
        q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    mask = torch.ones(1, 1, tokens, tokens, dtype=torch.bool).tril() if case == "mask" else None
    with torch.set_grad_enabled(case != "no_grad"):
        packed_sdpa_forward(_Attention(), q, k, v, mask, dropout=0.0, scaling=0.25)
    assert calls == []
