"""A tiny Llama-architecture model and BPE tokenizer built from scratch (no model hub).

Tests, the quickstart and people without hub access need a real causal LM that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load from a directory. ``make_tiny_model``
builds one in about a second:

* the model is a randomly initialised ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU,
  grouped-query attention: the same module names as real Llama checkpoints, so LoRA
  target detection, PEFT and DeepSpeed see what they see in production);
* the tokenizer is a byte-level BPE trained with ``tokenizers`` on generated English-like
  text, so any UTF-8 string encodes without unknown tokens;
* the tokenizer carries a chat template (documented in docs/trainer.md)::

      <s><|system|>\\n{content}</s>\\n<|user|>\\n{content}</s>\\n<|assistant|>\\n{content}</s>\\n

  Role markers are special tokens, every turn ends with the EOS token (so a model
  fine-tuned on chat data learns to stop), and ``add_generation_prompt`` appends
  ``<|assistant|>\\n``.

Everything is seeded: the same arguments give byte-identical files.
"""

from __future__ import annotations

import random
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

# A Jinja chat template in the style of Zephyr/TinyLlama: a role marker line, the
# content, then EOS. The BOS token comes from the template because chat rendering
# tokenizes with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an of to in on at for with from by and or but not is are was were be been has have had "
    "do does did will would can could should may might must this that these those it its they them "
    "their we our you your he she his her i me my what which who whom where when why how all any "
    "each every some many much more most few less one two three four five six seven eight nine ten "
    "zero first second last next new old good bad big small long short high low left right up down "
    "red blue green yellow black white orange purple brown grey cat dog bird fish horse cow sheep "
    "lion tiger bear mouse apple banana cherry grape lemon melon pear plum bread cheese water milk "
    "coffee tea house car road city river mountain sea sky sun moon star tree flower garden school "
    "book word letter number list answer question input output instruction response system user "
    "assistant model data train test value result example task text summary translate reverse copy "
    "sort count repeat capital country france paris spain madrid italy rome germany berlin japan "
    "tokyo learn teach read write speak say tell ask give take make find think know see look run "
    "walk go come play work help start stop open close keep turn move live love like want need use "
    "yes no true false positive negative neutral happy sad fast slow hot cold day night time year"
)
_WORDS = tuple(_WORD_TEXT.split())

#: A few common words for generated prompts (the serving tests' adapters and the serving bench).
PROMPT_WORDS: tuple[str, ...] = (
    "the", "cat", "dog", "bird", "red", "blue", "green", "one", "two", "three",
    "apple", "banana", "house", "car", "tree", "sun", "moon",
)  # fmt: skip


def _corpus(seed: int, lines: int = 600) -> list[str]:
    """Generated training text for the BPE tokenizer: words, numbers, letter strings, punctuation."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            words = rng.choices(_WORDS, k=rng.randint(4, 14))
            sentence = " ".join(words)
            out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":", ","]))
        elif kind == 1:
            out.append(" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 8))))
        elif kind == 2:
            letters = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 10)))
            out.append(f"{rng.choice(_WORDS)}: {' '.join(letters)} -> {letters}")
        else:
            out.append(f"### {rng.choice(_WORDS).title()}:\n{' '.join(rng.choices(_WORDS, k=6))}")
    return out


def _check_vocab_size(vocab_size: int) -> None:
    minimum = 256 + len(SPECIAL_TOKENS) + 16  # the byte alphabet, specials and a few merges
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: use at least {minimum}"
        )


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer on generated text; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        add_bos_token=True,  # like Llama: plain encodes start with <s>
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def make_tiny_model(
    output_dir: str | Path,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Build and save a random-weight Llama model plus tokenizer into ``output_dir``.

    Loadable with ``AutoModelForCausalLM.from_pretrained(output_dir)`` and
    ``AutoTokenizer.from_pretrained(output_dir)``. Returns the directory.

    ``initializer_range`` defaults to Llama's 0.02. With hidden size 64 and a frozen random
    output layer that caps the logits near +-1: a LoRA-tuned tiny model can get answers right
    but never becomes confident (loss stuck near 5). The quickstart uses 0.1, which lets the
    loss fall (or make ``lm_head`` a LoRA target).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory: choose another output path")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    _check_vocab_size(vocab_size)
    # Checked before the heavy imports so a typo fails in milliseconds.
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    # The global RNG is restored afterwards so callers' seeding is not disturbed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
