"""Human evaluation: blind sheets from real tiny models, ratings with a known truth, bad sheets."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.cli import main
from kubetune_trainer.evaluation import ModelEvaluator
from kubetune_trainer.evaluation.human import (
    HumanEvalError,
    export_sheet,
    import_ratings,
    wilson_interval,
)
from kubetune_trainer.quickstart import make_task_records

T_975_DF9 = 2.2621571627982  # Student's t, 97.5% quantile, 9 degrees of freedom (tables)
Z_975 = 1.959963984540054


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", make_task_records(10, seed=5))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny model with random (non-zero) B, so its outputs differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(out))
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _key(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- export


def test_export_with_real_models_is_blind_and_seeded(
    tiny_model_dir: Path, adapter_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    systems = {"base": str(tiny_model_dir), "tuned": str(adapter_dir)}
    opts: dict[str, Any] = {"max_new_tokens": 6, "batch_size": 4, "progress": False}
    first = export_sheet(systems, prompts_file, tmp_path / "a", seed=7, **opts)
    again = export_sheet(systems, prompts_file, tmp_path / "b", seed=7, **opts)
    other = export_sheet(systems, prompts_file, tmp_path / "c", seed=8, **opts)

    # Same seed -> the same sheet and key; another seed -> another row and slot order.
    assert first.csv.read_bytes() == again.csv.read_bytes()
    assert first.jsonl.read_bytes() == again.jsonl.read_bytes()
    assert _key(first.key)["items"] == _key(again.key)["items"]
    assert _key(first.key)["items"] != _key(other.key)["items"]

    rows = _rows(first.csv)
    assert first.items == len(rows) == 10
    assert list(rows[0]) == [
        "item", "prompt", "output_A", "score_A", "output_B", "score_B", "preference", "comment",
    ]  # fmt: skip
    # The sheet names no system: neither the names nor the paths appear anywhere in it.
    for sheet in (first.csv, first.jsonl):
        text = sheet.read_text(encoding="utf-8")
        for leak in ("base", "tuned", str(tiny_model_dir), str(adapter_dir), "adapter"):
            assert leak not in text, (sheet, leak)
    assert all(r["score_A"] == r["score_B"] == r["preference"] == "" for r in rows)

    key = _key(first.key)
    orders = [tuple(key["items"][r["item"]]["slots"].values()) for r in rows]
    assert set(orders) == {("base", "tuned"), ("tuned", "base")}  # slot order varies per row
    source = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    assert [key["items"][r["item"]]["source_line"] for r in rows] != list(range(1, 11))  # rows shuffled
    for r in rows:
        record = source[key["items"][r["item"]]["source_line"] - 1]
        assert r["prompt"] == f"{record['instruction']}\n\nInput:\n{record['input']}"

    # The key maps each slot to what that system generates (greedy), which differs between the two.
    from kubetune_trainer.config import FinetuningConfig
    from kubetune_trainer.finetuner import ModelFinetuner

    by_system: dict[str, list[str]] = {"base": [], "tuned": []}
    for r in rows:
        for slot, name in key["items"][r["item"]]["slots"].items():
            by_system[name].append(r[f"output_{slot}"])
    assert by_system["base"] != by_system["tuned"]
    for name, path in systems.items():
        ft = ModelFinetuner(FinetuningConfig(model_name=str(tiny_model_dir), train_file="unused.jsonl"))
        ft.load_finetuned_model(path)
        for r, shown in zip(rows, by_system[name], strict=True):
            record = source[key["items"][r["item"]]["source_line"] - 1]
            assert ft.generate(record, max_new_tokens=6, temperature=0).strip() == shown


def test_export_samples_prompts_and_shows_references(prompts_file: Path, tmp_path: Path) -> None:
    systems = {"echo": lambda p: p[:5], "upper": lambda p: p[:5].upper(), "len": lambda p: str(len(p))}
    result = export_sheet(
        systems, prompts_file, tmp_path, max_prompts=4, include_reference=True, progress=False
    )
    rows = _rows(result.csv)
    assert len(rows) == 4
    assert list(rows[0])[:3] == ["item", "prompt", "reference"]
    assert "preference" not in rows[0]  # three systems: scores only
    key = _key(result.key)
    assert key["rating"] == "score"
    source = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    for r in rows:
        item = key["items"][r["item"]]
        assert r["reference"] == source[item["source_line"] - 1]["output"]
        outputs = {name: r[f"output_{slot}"] for slot, name in item["slots"].items()}
        assert outputs == {
            "echo": r["prompt"][:5],
            "upper": r["prompt"][:5].upper(),
            "len": str(len(r["prompt"])),
        }


def test_export_reads_csv_and_chat_prompts(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text('prompt,completion\n"Say hi",hi\n"Say bye",bye\n', encoding="utf-8")
    chat = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    systems = {"x": lambda p: "x:" + p, "y": lambda p: "y:" + p}
    rows = _rows(export_sheet(systems, tmp_path / "p.csv", tmp_path / "csv", progress=False).csv)
    assert sorted(r["prompt"] for r in rows) == ["Say bye", "Say hi"]
    rows = _rows(export_sheet(systems, chat, tmp_path / "chat", progress=False).csv)
    assert rows[0]["prompt"] == "user: 2+2?"
    assert sorted([rows[0]["output_A"], rows[0]["output_B"]]) == ["x:user: 2+2?", "y:user: 2+2?"]


@pytest.mark.parametrize(
    ("systems", "kwargs", "message"),
    [
        ({"only": lambda p: p}, {}, "at least two"),
        ({"a": lambda p: p, "b": lambda p: p, "c": lambda p: p}, {"rating": "both"}, "use rating 'score'"),
        ({"a": lambda p: p, "b": lambda p: p}, {"rating": "stars"}, "not one of score, preference, both"),
        ({"a": lambda p: p, "b": lambda p: p}, {"scale": (5, 1)}, "the lower first"),
        ({"a": lambda p: p, "b": "/no/such/dir"}, {}, "no directory at /no/such/dir"),
    ],
)
def test_export_rejects_bad_requests(
    systems: dict, kwargs: dict, message: str, prompts_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(HumanEvalError, match=message):
        export_sheet(systems, prompts_file, tmp_path, progress=False, **kwargs)


def test_export_names_the_bad_data_line(tmp_path: Path) -> None:
    from kubetune_trainer.data import DataError

    bad = _write_jsonl(tmp_path / "p.jsonl", [{"instruction": "ok"}, {"instruction": 3}])
    with pytest.raises(DataError, match=r"p.jsonl, line 2, field 'instruction'"):
        export_sheet({"a": lambda p: p, "b": lambda p: p}, bad, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- import: numbers


def _callable_sheet(tmp_path: Path, n: int, rating: str | None = None) -> tuple[list[dict], dict, Path]:
    rows = [{"prompt": f"question {i}", "completion": str(i)} for i in range(n)]
    systems = {"good": lambda p: "good " + p, "bad": lambda p: "bad " + p}
    result = export_sheet(systems, rows, tmp_path / "sheet", seed=3, rating=rating, progress=False)
    return _rows(result.csv), _key(result.key), result.key


def _system_at(row: dict, key: dict) -> dict[str, str]:
    """system name -> slot letter of a sheet row (what only the key knows)."""
    return {name: slot for slot, name in key["items"][str(row["item"])]["slots"].items()}


def test_import_reports_the_hand_computed_statistics(tmp_path: Path) -> None:
    rows, key, key_path = _callable_sheet(tmp_path, 10)
    # The truth, per prompt number: "good" scores and "bad" scores, and the preference.
    good = [5, 4, 5, 3, 4, 5, 4, 2, 5, 3]
    bad = [2, 3, 4, 3, 1, 2, 4, 3, 2, 2]
    prefer = ["good"] * 6 + ["tie"] * 3 + ["bad"]
    for row in rows:
        i = int(row["prompt"].split()[-1])
        slot = _system_at(row, key)
        row[f"score_{slot['good']}"] = good[i]
        row[f"score_{slot['bad']}"] = bad[i]
        row["preference"] = "tie" if prefer[i] == "tie" else slot[prefer[i]].lower()  # lower case is fine
    filled = _write_rows(tmp_path / "filled.csv", rows)

    result = ModelEvaluator().import_human_eval(filled, key_path)

    def t_interval(xs: list[int]) -> tuple[float, float, float]:
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        half = T_975_DF9 * sd / math.sqrt(len(xs))
        return m, m - half, m + half

    for name, xs in (("good", good), ("bad", bad)):
        s = result.systems[name]
        mean, low, high = t_interval(xs)
        assert s.n == 10
        assert (
            s.mean == pytest.approx(mean)
            and s.ci_low == pytest.approx(low)
            and s.ci_high == pytest.approx(high)
        )
    assert result.systems["good"].mean == pytest.approx(4.0) and result.systems["bad"].mean == pytest.approx(
        2.6
    )

    # The preference decides wins: 6 wins, 3 ties, 1 loss -> (6 + 1.5) / 10 = 0.75.
    (pair,) = result.pairs
    assert (pair.system, pair.other, pair.n, pair.wins, pair.ties, pair.losses) == (
        "good",
        "bad",
        10,
        6,
        3,
        1,
    )
    assert pair.win_rate == pytest.approx(0.75)
    p, n, z = 0.75, 10, Z_975
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (pair.ci_low, pair.ci_high) == pytest.approx((centre - half, centre + half))
    assert result.systems["good"].win_rate == pytest.approx(0.75)
    assert result.systems["bad"].win_rate == pytest.approx(0.25)

    summary = result.summary()
    assert "good vs bad" in summary and "0.750" in summary and "4.00" in summary
    data = json.loads(result.to_json(tmp_path / "result.json"))
    assert data["systems"]["good"]["mean_score_ci"] == pytest.approx(
        [result.systems["good"].ci_low, result.systems["good"].ci_high]
    )
    assert json.loads((tmp_path / "result.json").read_text())["pairwise"][0]["win_rate"] == pytest.approx(
        0.75
    )


def test_wins_from_scores_and_wilson_matches_scipy(tmp_path: Path) -> None:
    from scipy.stats import binomtest

    rows, key, key_path = _callable_sheet(tmp_path, 10, rating="score")
    assert "preference" not in rows[0]
    for row in rows:
        i = int(row["prompt"].split()[-1])
        slot = _system_at(row, key)
        # good wins prompts 0-6 (4 > 2), ties prompt 7 (2 = 2), loses prompts 8-9 (2 < 5)
        row[f"score_{slot['good']}"] = 4 if i < 7 else 2
        row[f"score_{slot['bad']}"] = 5 if i >= 8 else 2
    result = import_ratings(_write_rows(tmp_path / "filled.csv", rows), key_path)
    (pair,) = result.pairs
    assert (pair.wins, pair.ties, pair.losses) == (7, 1, 2)
    assert pair.win_rate == pytest.approx(0.75)
    # Without ties Wilson's interval is scipy's; with fractional successes it follows the same formula.
    ci = binomtest(7, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(7, 10) == pytest.approx((ci.low, ci.high))
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(
        0.0
    )


def test_several_raters_are_pooled_and_jsonl_sheets_work(tmp_path: Path) -> None:
    rows, key, key_path = _callable_sheet(tmp_path, 4)
    jsonl = [json.loads(line) for line in (key_path.parent / "sheet.jsonl").read_text().splitlines()]
    for sheet in jsonl:  # rater 2 fills the JSONL sheet, with numbers
        slot = _system_at(sheet, key)
        sheet[f"score_{slot['good']}"], sheet[f"score_{slot['bad']}"] = 5, 1
        sheet["preference"] = slot["good"]
    (tmp_path / "rater2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    for row in rows:  # rater 1: the CSV, all ties at 3
        row["score_A"] = row["score_B"] = "3"
        row["preference"] = "TIE"
    rater1 = _write_rows(tmp_path / "rater1.csv", rows)
    result = import_ratings([rater1, tmp_path / "rater2.jsonl"], key_path)
    assert (result.items, result.judgements) == (4, 8)
    assert result.systems["good"].mean == pytest.approx(4.0) and result.systems["bad"].mean == pytest.approx(
        2.0
    )
    assert result.pairs[0].win_rate == pytest.approx((4 + 0.5 * 4) / 8)


# --------------------------------------------------------------------------- import: bad sheets


@pytest.fixture
def filled(tmp_path: Path) -> tuple[list[dict], dict, Path]:
    rows, key, key_path = _callable_sheet(tmp_path, 5)
    for row in rows:
        row["score_A"], row["score_B"], row["preference"] = "4", "2", "A"
    return rows, key, key_path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda rows: rows[2].update(score_B="7"),
            r"filled.csv, row 4, column 'score_B': '7' is out of range 1-5",
        ),
        (lambda rows: rows[0].update(score_A=""), r"row 2, column 'score_A': the rating is missing"),
        (lambda rows: rows[1].update(score_A="good"), r"row 3, column 'score_A': 'good' is not a number"),
        (lambda rows: rows[1].update(score_A="3.5"), r"row 3, column 'score_A': '3.5' is not a whole number"),
        (
            lambda rows: rows[4].update(preference="C"),
            r"row 6, column 'preference': 'C' is not a slot.*one of A, B, tie",
        ),
        (
            lambda rows: rows[3].update(preference=" "),
            r"row 5, column 'preference': the preference is missing",
        ),
        (lambda rows: rows[1].update(item="99"), r"row 3, column 'item': item 99 is not in the key"),
        (lambda rows: rows[1].update(item=rows[0]["item"]), r"row 3: item \d+ appears twice"),
        (lambda rows: rows[1].update(prompt="another question"), r"row 3, column 'prompt': not the prompt"),
        (lambda rows: [r.pop("preference") for r in rows], r"column 'preference' is missing"),
        (lambda rows: rows.pop(), r"items \d+ of the key are not in the sheet.*--skip-unrated"),
    ],
)
def test_bad_sheets_name_file_row_and_column(filled, edit, message: str, tmp_path: Path) -> None:
    rows, _, key_path = filled
    edit(rows)
    sheet = _write_rows(tmp_path / "filled.csv", rows)
    with pytest.raises(HumanEvalError, match=message):
        import_ratings(sheet, key_path)


def test_skip_unrated_rates_a_subset(filled, tmp_path: Path) -> None:
    rows, _, key_path = filled
    rows[0].update(score_A="", score_B="", preference="")
    rows.pop()
    sheet = _write_rows(tmp_path / "filled.csv", rows)
    with pytest.raises(HumanEvalError, match="row 2, column 'score_A': the rating is missing"):
        import_ratings(sheet, key_path)
    result = import_ratings(sheet, key_path, skip_unrated=True)
    assert (result.items, result.judgements) == (3, 3)


def test_bad_key_and_jsonl_errors(filled, tmp_path: Path) -> None:
    rows, _, key_path = filled
    sheet = _write_rows(tmp_path / "filled.csv", rows)
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(HumanEvalError, match="not a human-evaluation key"):
        import_ratings(sheet, tmp_path / "other.json")
    with pytest.raises(HumanEvalError, match=r"key file .*missing\.json does not exist"):
        import_ratings(sheet, tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text('{"item": 1}\n{"item": 2,\n')
    with pytest.raises(HumanEvalError, match=r"bad.jsonl, line 2: invalid JSON"):
        import_ratings(tmp_path / "bad.jsonl", key_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HumanEvalError, match=r"empty\.jsonl: the sheet has no rows"):
        import_ratings(tmp_path / "empty.jsonl", key_path)
    (tmp_path / "sheet.xlsx").write_bytes(b"PK")
    with pytest.raises(HumanEvalError, match=r"unsupported sheet type '\.xlsx'"):
        import_ratings(tmp_path / "sheet.xlsx", key_path)


# --------------------------------------------------------------------------- the command line


def test_cli_round_trip_with_an_adapter(
    tiny_model_dir: Path, adapter_dir: Path, prompts_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval"
    code = main([
        "eval", "export", "--data", str(prompts_file), "--system", f"base={tiny_model_dir}",
        "--system", f"tuned={adapter_dir}", "--out", str(out), "--max-prompts", "6", "--max-new-tokens", "4",
        "--scale", "1-3", "--seed", "1",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 items x 2 systems" in printed and "kubetune eval import" in printed
    rows = _rows(out / "sheet.csv")
    key = _key(out / "key.json")
    assert key["scale"] == [1, 3] and len(rows) == 6
    for row in rows:  # raters like the tuned system's output, score 3 vs 1
        slot = _system_at(row, key)
        row[f"score_{slot['tuned']}"], row[f"score_{slot['base']}"] = 3, 1
        row["preference"] = slot["tuned"]
    filled = _write_rows(tmp_path / "filled.csv", rows)

    assert (
        main(
            [
                "eval",
                "import",
                str(filled),
                "--key",
                str(out / "key.json"),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tuned vs base" in printed or "base vs tuned" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["systems"]["tuned"]["mean_score"] == 3.0 and data["systems"]["base"]["mean_score"] == 1.0
    assert data["systems"]["tuned"]["win_rate"] == 1.0

    rows[0]["score_A"] = 4  # off the 1-3 scale: exit 3 (bad data) and the message, no traceback
    _write_rows(filled, rows)
    assert main(["eval", "import", str(filled), "--key", str(out / "key.json")]) == 3
    err = capsys.readouterr().err
    assert "row 2, column 'score_A': '4' is out of range 1-3" in err and "Traceback" not in err


# --------------------------------------------------------------------------- s3


@pytest.mark.s3
def test_export_reads_adapter_and_prompts_from_s3(
    s3,
    s3_bucket: str,
    tiny_model_dir: Path,
    adapter_dir: Path,
    prompts_file: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    client = s3.client()
    for f in adapter_dir.iterdir():
        client.upload_file(str(f), s3_bucket, f"runs/tuned/{f.name}")
    client.upload_file(str(prompts_file), s3_bucket, "data/prompts.jsonl")
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    opts: dict[str, Any] = {"max_prompts": 3, "max_new_tokens": 4, "progress": False}

    remote = export_sheet(
        {"base": str(tiny_model_dir), "tuned": f"s3://{s3_bucket}/runs/tuned/"},
        f"s3://{s3_bucket}/data/prompts.jsonl",
        tmp_path / "remote",
        **opts,
    )
    local = export_sheet(
        {"base": str(tiny_model_dir), "tuned": str(adapter_dir)}, prompts_file, tmp_path / "local", **opts
    )
    assert remote.csv.read_bytes() == local.csv.read_bytes()  # the same outputs in the same places
    assert _key(remote.key)["systems"]["tuned"] == f"s3://{s3_bucket}/runs/tuned/"

    with pytest.raises(HumanEvalError, match=f"system 'tuned'.*s3://{s3_bucket}/nothing/"):
        export_sheet(
            {"base": str(tiny_model_dir), "tuned": f"s3://{s3_bucket}/nothing/"},
            prompts_file,
            tmp_path / "x",
            **opts,
        )
