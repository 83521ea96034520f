"""Two real LoRA adapters for the serving tests, trained with PEFT + transformers' Trainer.

Each adapter learns to answer any short prompt with its own fixed phrase (then EOS), so greedy
answers differ per adapter and from the random base model. The tiny model's output layer has
small random weights, so ``lm_head`` is a LoRA target too: without it a LoRA on the attention and
MLP layers cannot make the logits peaked enough to learn the phrase in a few dozen steps.

Training runs once per test session (cached by directory); test modules import the fixtures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune_trainer.tiny_model import PROMPT_WORDS

PHRASES = {"red": " red cat red cat", "num": " one two three four"}
RANKS = {"red": 8, "num": 4}  # different ranks: mixed batches must handle both
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]


def task_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(PROMPT_WORDS, k=rng.randint(1, 7))) + " ->" for _ in range(n)]


def train_adapter(
    base_dir: Path, out_dir: Path, phrase: str, rank: int, steps: int = 40, targets: list[str] | None = None
) -> Path:
    """Train a LoRA adapter that answers every prompt with ``phrase``; returns its directory."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(base_dir)
    answer = [*tok(phrase, add_special_tokens=False).input_ids, tok.eos_token_id]
    examples = []
    for prompt in task_prompts(64, seed=rank):
        ids = tok(prompt).input_ids
        examples.append({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer})

    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        out = {
            "input_ids": torch.full((len(batch), width), tok.pad_token_id),
            "labels": torch.full((len(batch), width), -100),
            "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
        }
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
            out["labels"][i, :n] = torch.tensor(b["labels"])
            out["attention_mask"][i, :n] = 1
        return out

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets or TARGETS, task_type=TaskType.CAUSAL_LM
        ),
    )
    args = TrainingArguments(
        output_dir=str(out_dir.with_name(out_dir.name + "-run")),
        max_steps=steps,
        learning_rate=1e-2,
        per_device_train_batch_size=16,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=rank,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate).train()
    model.save_pretrained(out_dir, save_embedding_layers=False)  # lm_head itself is unchanged
    return out_dir


@dataclass(frozen=True)
class ServeModels:
    base: Path
    adapters: dict[str, Path]


_CACHE: dict[Path, ServeModels] = {}
# Each test module imports the fixture, and pytest makes one session fixture per importing module:
# without this, every module would build its own base model and train both adapters again.
_SESSION: list[ServeModels] = []


def build_serve_models(base: Path, root: Path) -> ServeModels:
    if base not in _CACHE:
        adapters = {n: train_adapter(base, root / n, PHRASES[n], RANKS[n]) for n in PHRASES}
        _CACHE[base] = ServeModels(base, adapters)
    return _CACHE[base]


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory: pytest.TempPathFactory) -> ServeModels:
    """The tiny base model and two trained adapters, "red" and "num"."""
    from kubetune_trainer.tiny_model import make_tiny_model

    if _SESSION and _SESSION[0].base.is_dir():
        return _SESSION[0]
    # Init range 0.1 (as the quickstart): with Llama's 0.02 the tiny model's logits stay near +-1 and
    # the test adapters' greedy answers are not confident enough to tell adapters apart reliably.
    base = make_tiny_model(tmp_path_factory.mktemp("serve-base"), initializer_range=0.1)
    _SESSION[:] = [build_serve_models(base, tmp_path_factory.mktemp("serve-adapters"))]
    return _SESSION[0]
