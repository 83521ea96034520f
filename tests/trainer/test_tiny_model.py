"""The tiny model: loads with the Auto classes, deterministic, chat template, CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune_trainer.tiny_model import make_tiny_model


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_loads_with_auto_classes_and_runs(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok) == 512
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == "The capital of France is Paris."
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(out.loss)
    # Random init: the loss is close to uniform over the vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 1.0
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def test_byte_level_tokenizer_has_no_unknowns(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Ünïcödé ✓ 東京 🙂 tabs\tand\nnewlines"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_template(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    # Role markers are single special tokens.
    assert len(tok("<|assistant|>", add_special_tokens=False).input_ids) == 1


def test_deterministic_and_fast(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "warm")  # imports and first-call overhead are not what we time
    start = time.monotonic()
    a = make_tiny_model(tmp_path / "a", seed=3)
    elapsed = time.monotonic() - start
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert elapsed < 5.0


def test_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        make_tiny_model(tmp_path / "m", vocab_size=100)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        make_tiny_model(tmp_path / "m", hidden_size=30, num_heads=4)


def test_cli_make_tiny_model(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "make-tiny-model", str(tmp_path / "cli"), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_trainer",
            "make-tiny-model",
            str(tmp_path / "x"),
            "--vocab-size",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "too small" in bad.stderr
    assert "Traceback" not in bad.stderr
