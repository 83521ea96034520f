"""Data augmentation: synonyms (built-in thesaurus and a user file), paraphrase and back-translation
through tiny local models, dedup, caps, counts, and that only the training split is augmented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer.config import AugmentationSettings, FinetuningConfig
from kubetune_trainer.data import DataError, DataOptions, DataSource, prepare_datasets, replace_synonyms
from kubetune_trainer.data.augment import Item, Rewriter, augment, paraphrase
from kubetune_trainer.data.synonyms import builtin_synonyms, load_synonyms
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.tiny_model import build_tokenizer

PROMPT = "Rewrite: {text}\nRewritten:"
# What the tiny paraphrase model is trained to answer. "stop the car" and "halt the car" get the same
# rewrite (the second is a duplicate of the first's variant); "park the car" is answered unchanged
# (a duplicate of its original).
TWISTS = {
    "open the door": "open the gate",
    "close the window": "shut the window",
    "stop the car": "halt the car",
    "halt the car": "halt the car",
    "park the car": "park the car",
    "read the book": "read the novel",
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def rewrite_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama trained for a few seconds to answer TWISTS (greedy decoding reproduces them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("rewrite-model"), seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    rows = []
    for src, dst in TWISTS.items():  # loss on the answer only: the prompt is not predictable
        prompt = tok(PROMPT.replace("{text}", src), add_special_tokens=False)["input_ids"]
        answer = tok(" " + dst, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    n = max(len(ids) for ids, _ in rows)
    pad = [tok.eos_token_id]
    input_ids = torch.tensor([pad * (n - len(ids)) + ids for ids, _ in rows])  # left padding, as generation
    labels = torch.tensor([[-100] * (n - len(lab)) + lab for _, lab in rows])
    mask = torch.tensor([[0] * (n - len(ids)) + [1] * len(ids) for ids, _ in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(200):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.03:
            break
    assert loss.item() < 0.03, f"the tiny rewrite model did not learn its answers (loss {loss.item():.3f})"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def seq2seq_model(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> str:
    """A tiny T5 with random weights (proves the encoder-decoder path: loading, batching, decoding)."""
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ---- synonyms -------------------------------------------------------------------------------------


def test_builtin_thesaurus_is_offline_and_two_way() -> None:
    source = builtin_synonyms()
    assert "automobile" in source.lookup("car")
    assert "car" in source.lookup("automobile")  # two-way relations only
    assert source.lookup("the") == []  # function words are never replaced
    assert all(" " not in s for s in source.lookup("quick"))  # single words only


def test_builtin_thesaurus_needs_no_network(tmp_path: Path) -> None:
    """Runs in a fresh process with no network namespace access (unshare -n) when the kernel allows it."""
    code = (
        "from kubetune_trainer.data.augment import replace_synonyms;"
        "print(replace_synonyms('the car is fast', 1.0, seed=1))"
    )
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    cmd = (
        ["unshare", "-rn", sys.executable, "-c", code]
        if probe.returncode == 0
        else [sys.executable, "-c", code]
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("the ") and out != "the car is fast"


def test_replace_synonyms_with_a_file(tmp_path: Path) -> None:
    syn = tmp_path / "syn.txt"
    syn.write_text("# word,synonyms\ncar,automobile\nfast,quick,rapid\n")
    out = replace_synonyms("The Car is FAST.", 1.0, seed=7, synonyms=syn)
    assert out in ("The Automobile is QUICK.", "The Automobile is RAPID.")
    assert replace_synonyms("The Car is FAST.", 1.0, seed=7, synonyms=syn) == out  # same seed, same result
    half = replace_synonyms("car fast", 0.5, seed=1, synonyms=syn)
    assert sum(a != b for a, b in zip(half.split(), ["car", "fast"], strict=True)) == 1  # one of two words
    js = tmp_path / "syn.json"
    js.write_text(json.dumps({"door": ["gate"]}))
    assert replace_synonyms("open the door", 1.0, synonyms=js) == "open the gate"


def test_bad_synonyms_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"car": "automobile"}')
    with pytest.raises(DataError, match=r"bad\.json.*'car'.*not a list of strings.*Fix:"):
        load_synonyms(bad)
    with pytest.raises(DataError, match="synonyms file not found"):
        load_synonyms(tmp_path / "missing.txt")


ROWS = [{"instruction": f"Describe car number {i}", "output": f"car {i} is fast"} for i in range(10)]


def test_synonyms_augment_only_the_train_split(tmp_path: Path, tokenizer) -> None:
    syn = tmp_path / "syn.txt"
    syn.write_text("car,automobile,auto\ndescribe,portray\nfast,quick\n")
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    aug = AugmentationSettings(synonyms={"fraction": 1.0, "variants": 2, "synonyms_file": str(syn)})
    options = DataOptions(validation_split=0.2, augmentation=aug, seed=5)
    data = prepare_datasets(tokenizer, [DataSource(write_jsonl(tmp_path / "t.jsonl", ROWS))], options,
                            test=DataSource(test))  # fmt: skip
    counts = data.stats.augmentation["replace_synonyms"]
    variants = data.train.examples[8:]
    # 8 train examples x 2 variants; "car" has two synonyms, so an example's two variants coincide
    # when both draw the same one, and the repeat is dropped.
    assert counts["generated"] == 16 and counts["kept"] + counts["dropped"] == 16
    assert counts["kept"] == len(variants) == len({e.fields["instruction"] for e in variants}) > 8
    assert data.stats.train_examples == 8 + counts["kept"]
    assert data.stats.sources[0].augmented == counts["kept"]
    for ex in variants:
        words = ex.fields["instruction"].split()
        assert words[0] == "Portray" and words[1] in ("automobile", "auto")  # capitalisation kept
        assert ex.fields["output"].startswith("car ")  # the response is left alone by default
    originals = {json.dumps(r, sort_keys=True) for r in ROWS}
    for split in (data.validation, data.test):
        for ex in split.examples:  # validation and test are the files' own examples
            assert json.dumps({k: v for k, v in ex.fields.items() if v}, sort_keys=True) in originals
    summary = (
        f"augmentation replace_synonyms: 16 generated, {counts['kept']} kept, {counts['dropped']} dropped"
    )
    assert summary in data.stats.summary()
    # Deterministic for a seed; another seed picks other synonyms.
    again = prepare_datasets(tokenizer, [DataSource(str(tmp_path / "t.jsonl"))], options)
    assert [e.fields for e in again.train.examples] == [e.fields for e in data.train.examples]


def test_include_response_and_dedupe_of_variants(tmp_path: Path, tokenizer) -> None:
    syn = tmp_path / "syn.txt"
    syn.write_text("fast,quick\n")
    rows = [{"instruction": "Say it", "output": "fast"}, {"instruction": "Say it", "output": "quick"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    aug = AugmentationSettings(synonyms={"variants": 3, "synonyms_file": str(syn), "include_response": True})
    data = prepare_datasets(tokenizer, [DataSource(path)], DataOptions(augmentation=aug))
    # "fast" -> "quick" repeats the second original; "Say it" has no synonym; each repeat is dropped.
    assert data.stats.augmentation["replace_synonyms"] == {"generated": 6, "kept": 0, "dropped": 6}
    assert data.stats.train_examples == 2


# ---- model rewriting ------------------------------------------------------------------------------


def test_paraphrase_function_reproduces_the_trained_rewrites(rewrite_model: str) -> None:
    assert paraphrase("open the door", rewrite_model, prompt=PROMPT) == "open the gate"
    got = paraphrase(list(TWISTS), rewrite_model, prompt=PROMPT, batch_size=4)
    assert got == list(TWISTS.values())


def test_paraphrase_in_the_pipeline_dedupes_and_counts(tmp_path: Path, tokenizer, rewrite_model: str) -> None:
    rows = [{"instruction": src, "output": f"done {i}"} for i, src in enumerate(TWISTS)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    aug = AugmentationSettings(paraphrase={"model": rewrite_model, "prompt": PROMPT, "batch_size": 4})
    data = prepare_datasets(tokenizer, [DataSource(path)], DataOptions(augmentation=aug))
    # 6 rewrites: "halt the car" twice (the original "halt the car" is answered unchanged, and "stop the
    # car" becomes "halt the car" with another output, so only the former repeats), "park the car" unchanged.
    assert data.stats.augmentation["paraphrase"] == {"generated": 6, "kept": 4, "dropped": 2}
    added = {(e.fields["instruction"], e.fields["output"]) for e in data.train.examples[6:]}
    assert added == {
        ("open the gate", "done 0"),
        ("shut the window", "done 1"),
        ("halt the car", "done 2"),
        ("read the novel", "done 5"),
    }


def test_paraphrase_cap_and_batches(tmp_path: Path, tokenizer, rewrite_model: str) -> None:
    rows = [{"text": src} for src in TWISTS]
    items = [Item(f"k{i}", "text", r) for i, r in enumerate(rows)]
    made: list[Rewriter] = []

    def counting_rewriter(model: str, **kw) -> Rewriter:
        made.append(Rewriter(model, **kw))
        return made[-1]

    aug = AugmentationSettings(
        paraphrase={
            "model": rewrite_model,
            "prompt": PROMPT,
            "batch_size": 2,
            "variants": 2,
            "max_variants": 3,
        }
    )
    variants, counts = augment(
        items, aug, seed=1, dedupe="exact", seen_keys=set(), rewriter=counting_rewriter
    )
    assert counts["paraphrase"].generated == 3  # the cap, not 6 x 2
    assert made[0].batches == 1  # 2 texts chosen (ceil(3 / 2)), one batch of 2
    chosen = {v.index for v in variants}
    assert 1 <= len(chosen) <= 2
    # Two beams per text; the best one is the trained rewrite (kept here, or as an earlier duplicate).
    assert {TWISTS[rows[i]["text"]] for i in chosen} <= {v.fields["text"] for v in variants}
    again, _ = augment(items, aug, seed=1, dedupe="exact", seen_keys=set())
    assert [v.fields for v in again] == [v.fields for v in variants]  # deterministic


def test_back_translation_through_seq2seq_and_causal(
    tmp_path: Path, seq2seq_model: str, rewrite_model: str
) -> None:
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(5)]
    items = [Item(f"k{i}", "completion", r) for i, r in enumerate(rows)]
    made: list[Rewriter] = []

    def counting_rewriter(model: str, **kw) -> Rewriter:
        made.append(Rewriter(model, **kw))
        return made[-1]

    aug = AugmentationSettings(
        back_translation={"model": seq2seq_model, "back_model": rewrite_model, "back_prompt": PROMPT,
                          "batch_size": 2, "variants": 2, "max_new_tokens": 6}
    )  # fmt: skip
    variants, counts = augment(
        items, aug, seed=3, dedupe="exact", seen_keys=set(), rewriter=counting_rewriter
    )
    c = counts["back_translate"]
    assert c.generated == 10 and c.kept + c.dropped == 10
    assert [r.seq2seq for r in made] == [True, False]
    assert made[0].batches == 3  # 5 prompts in batches of 2
    assert made[1].batches == 5  # 10 pivot texts back in batches of 2
    for v in variants:  # only the prompt was rewritten
        assert v.fields["completion"] == rows[v.index]["completion"]


# ---- configuration --------------------------------------------------------------------------------


def test_config_rejects_bad_augmentation_with_the_field_named(tmp_path: Path) -> None:
    base = {"model_name": "m", "train_file": "t.jsonl"}
    cases = [
        ({}, "augmentation needs at least one method"),
        ({"synonyms": {"fraction": 0}}, "augmentation.synonyms.fraction"),
        ({"synonyms": {"variants": 17}}, "augmentation.synonyms.variants"),
        ({"paraphrase": {"model": "m", "prompt": "no placeholder"}}, "must contain {text}"),
        (
            {"paraphrase": {"model": "m", "variants": 4, "max_variants": 2}},
            "paraphrase.max_variants: maxVariants is below variants",
        ),
        ({"back_translation": {"model": "m"}}, "augmentation.back_translation.back_model"),
        ({"synonym": {}}, "did you mean 'synonyms'"),
    ]
    for aug, message in cases:
        with pytest.raises(ConfigError, match=message):
            FinetuningConfig.from_dict({**base, "augmentation": aug})


def test_config_paths_are_relative_to_the_yaml(tmp_path: Path, rewrite_model: str) -> None:
    (tmp_path / "syn.txt").write_text("car,auto\n")
    (tmp_path / "job.yaml").write_text(
        "model_name: m\ntrain_file: t.jsonl\naugmentation:\n  synonyms: {synonyms_file: syn.txt}\n"
        f"  paraphrase: {{model: {rewrite_model}}}\n  back_translation: {{model: org/to-de, back_model: org/to-en}}\n"
    )
    cfg = FinetuningConfig.from_yaml(tmp_path / "job.yaml")
    assert cfg.augmentation.synonyms.synonyms_file == str(tmp_path / "syn.txt")
    assert cfg.augmentation.paraphrase.model == rewrite_model
    assert cfg.augmentation.back_translation.model == "org/to-de"  # a hub id stays as given


# ---- a pod: s3:// synonyms and model, counts in the report and the provenance -----------------------


@pytest.mark.s3
@pytest.mark.slow
def test_a_pod_augments_with_s3_inputs_and_reports_the_counts(
    s3, s3_bucket: str, tiny_model_dir: Path, rewrite_model: str, tmp_path: Path
) -> None:
    client = s3.client()
    rows = [{"instruction": src, "output": f"done {i}"} for i, src in enumerate(TWISTS)]
    rows += [{"instruction": f"Describe car number {i}", "output": f"car {i}"} for i in range(10)]
    client.put_object(
        Bucket=s3_bucket, Key="aug/train.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    client.put_object(Bucket=s3_bucket, Key="aug/synonyms.txt", Body=b"car,automobile\ndoor,gate\n")
    for f in Path(rewrite_model).iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"aug/paraphraser/{f.name}", Body=f.read_bytes())
    report_file = tmp_path / "termination-log"
    config = {
        "model_name": str(tiny_model_dir),
        "train_file": f"s3://{s3_bucket}/aug/train.jsonl",
        "validation_split": 0.25,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "progress_bar": False,
        "augmentation": {
            "synonyms": {"synonyms_file": f"s3://{s3_bucket}/aug/synonyms.txt"},
            "paraphrase": {"model": f"s3://{s3_bucket}/aug/paraphraser", "prompt": PROMPT, "max_variants": 5},
        },
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    env = {**os.environ, **s3.env(), "KUBETUNE_TERMINATION_MESSAGE_PATH": str(report_file), "DS_ACCELERATOR": "cpu",
           "KUBETUNE_CACHE": str(tmp_path / "cache")}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(report_file.read_text())["augmentation"]
    assert set(report) == {"replace_synonyms", "paraphrase"}
    assert report["paraphrase"]["generated"] == 5  # the cap
    # 12 training examples (16 less 4 held out); at least 6 of the 10 "car" rows stay in training.
    syn = report["replace_synonyms"]
    assert syn["generated"] == 12 and syn["kept"] + syn["dropped"] == 12 and syn["kept"] >= 6
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["data_stats"]["augmentation"] == report
    assert "augmentation replace_synonyms: 12 generated" in res.stderr + res.stdout
