"""Batching: padding-free packing is exactly equivalent to running each sequence alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune_trainer.data import IGNORE_INDEX, make_collator
from kubetune_trainer.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_llama(vocab_size: int, attn: str) -> LlamaForCausalLM:
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
    return model.eval()


def features(tokenizer) -> list[dict[str, list[int]]]:
    # Different lengths, and a prompt masked with -100 at the start of two of them.
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_sequence_logits(tokenizer, attn):
    model = tiny_llama(len(tokenizer), attn)
    feats = features(tokenizer)
    batch = make_collator(tokenizer, packing=True)(feats)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    assert batch["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in feats)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        start = 0
        for f in feats:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n


def test_without_restarting_positions_sequences_would_contaminate(tokenizer):
    # Negative control: the same flattened row without per-sequence position_ids attends across
    # examples, so the equivalence above is a real property of the position_ids, not a tautology.
    model = tiny_llama(len(tokenizer), "sdpa")
    feats = features(tokenizer)
    batch = make_collator(tokenizer, packing=True)(feats)
    n0 = len(feats[0]["input_ids"])
    with torch.no_grad():
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        second_alone = model(input_ids=torch.tensor([feats[1]["input_ids"]]), use_cache=False).logits[0]
    assert not torch.allclose(naive[n0 : n0 + len(feats[1]["input_ids"])], second_alone, atol=1e-3)


def test_packed_loss_equals_padded_loss(tokenizer):
    model = tiny_llama(len(tokenizer), "sdpa")
    feats = features(tokenizer)
    packed = make_collator(tokenizer, packing=True)(feats)
    padded = make_collator(tokenizer, packing=False)(feats)
    assert padded["input_ids"].shape == (len(feats), max(len(f["input_ids"]) for f in feats))
    with torch.no_grad():
        loss_packed = model(**packed, use_cache=False).loss
        loss_padded = model(**padded, use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)


def test_packing_masks_the_first_label_of_every_sequence(tokenizer):
    # Otherwise the last token of one example would be trained to predict the next example's first token.
    feats = features(tokenizer)
    batch = make_collator(tokenizer, packing=True)(feats)
    starts = [sum(len(f["input_ids"]) for f in feats[:i]) for i in range(len(feats))]
    assert all(batch["labels"][0, s].item() == IGNORE_INDEX for s in starts)
    assert [batch["position_ids"][0, s].item() for s in starts] == [0] * len(feats)


def test_padding_collator_pads_right_with_ignored_labels(tokenizer):
    tokenizer.padding_side = "left"  # as set for generation: training batches must still be right-padded
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = make_collator(tokenizer, packing=False, pad_to_multiple_of=4)(feats)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, tokenizer.pad_token_id],
        [8] + [tokenizer.pad_token_id] * 3,
    ]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_trainer_evaluates_packed_batches_like_padded_ones(tokenizer, tmp_path):
    # End to end through transformers' Trainer with a model whose config keeps the default
    # use_cache=True: Trainer turns the cache off for training/evaluation, and only without a cache
    # does transformers build the block-diagonal mask from position_ids.
    from transformers import Trainer, TrainingArguments

    from kubetune_trainer.data import DataOptions, DataSource, prepare_datasets

    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(
            f'{{"prompt": "count {i} {"and " * (i % 5)}then", "completion": " {i + 1} {i + 2}"}}'
            for i in range(8)
        )
    )
    prepared = prepare_datasets(tokenizer, [DataSource(str(data))], DataOptions(max_seq_length=64))
    model = tiny_llama(len(tokenizer), "sdpa")
    assert model.config.use_cache is True
    losses = {}
    for packing in (True, False):
        args = TrainingArguments(
            output_dir=str(tmp_path / f"out-{packing}"),
            per_device_eval_batch_size=8,
            report_to=[],
            use_cpu=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            eval_dataset=prepared.train,
            data_collator=make_collator(tokenizer, packing),
        )
        losses[packing] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
