"""Human evaluation: a blind rating sheet of several systems' outputs, and the statistics of the ratings.

Export generates each system's answer to the same prompts and writes ``sheet.csv`` and ``sheet.jsonl``
(what raters see: prompts in a seeded random order, each row's outputs in its own random slot order
A, B, ...) and ``key.json`` (which system sits in which slot of each row: kept from the raters).
Import reads one or more filled-in sheets with the key and reports per system the mean score with
a 95% t-interval, and per pair of systems the win rate (ties count half) with a 95% Wilson interval.

Systems are model or adapter directories (local or ``s3://``) or ``generate_func(prompt) -> str``
callables. This module imports torch only when it loads a model (``kubetune_trainer.evaluation``
stays torch-free).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.exit_codes import ExitCode, TrainerError

log = logging.getLogger(__name__)

SHEET_CSV = "sheet.csv"
SHEET_JSONL = "sheet.jsonl"
KEY_FILE = "key.json"
KEY_FORMAT = "kubetune-human-eval/v1"
RATINGS = ("score", "preference", "both")
DEFAULT_SCALE = (1, 5)
TIE = "tie"
SLOT_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CONFIDENCE = 0.95

SystemSpec = str | os.PathLike[str] | Callable[[str], str]


class HumanEvalError(TrainerError, ValueError):
    """A bad sheet, key or export request; the message names the file, row and column and the fix."""

    exit_code = ExitCode.BAD_DATA


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the data file: the record (encoded like training did) and its text for raters."""

    source_line: int  # where the record starts in the data file
    record: dict[str, Any]
    format: str
    text: str  # what raters read
    reference: str


def load_prompts(
    dataset: str | os.PathLike[str] | Sequence[dict[str, Any]], fmt: str = "auto"
) -> list[EvalPrompt]:
    """The prompts of a data file (JSON, JSONL, CSV, Parquet; local or s3://) or of a list of records.

    Every training format works: instruction, completion and chat records (a final assistant turn
    is the reference, not part of the prompt); a text record's text is the prompt to continue.
    """
    from kubetune_trainer.data.formats import check_format_name, detect_format, validate
    from kubetune_trainer.data.readers import Record, read_records

    if isinstance(dataset, str | os.PathLike):
        name = str(dataset)
        with tempfile.TemporaryDirectory(prefix="kubetune-human-eval-") as scratch:
            records = read_records(_local_data_file(name, Path(scratch)), name=name)
    else:
        records = [Record("<dataset>", i + 1, dict(row), unit="record") for i, row in enumerate(dataset)]
        if not records:
            raise HumanEvalError("the prompt dataset is empty: give at least one record")
    file_format = detect_format(records[0]) if fmt == "auto" else check_format_name(fmt, records[0].file)
    prompts = []
    for rec in records:
        fields = validate(rec, file_format, require_response=False)  # DataError names file, line, field
        text, reference = _prompt_text(fields, file_format)
        prompts.append(EvalPrompt(rec.line, rec.data, file_format, text, reference))
    return prompts


def _local_data_file(path: str, scratch: Path) -> Path:
    if not path.startswith("s3://"):
        return Path(path)
    from kubetune_trainer.storage import S3Uri, s3_client_from_env
    from kubetune_trainer.storage.transfer import download_files

    uri = S3Uri.parse(path, field="prompt data file")
    local = scratch / Path(uri.key).name
    download_files(s3_client_from_env(), [(uri, local, None)], what=f"download of {path}")
    return local


def _prompt_text(fields: dict[str, Any], fmt: str) -> tuple[str, str]:
    """(prompt as raters read it, reference answer or "")."""
    if fmt == "instruction":
        text = fields["instruction"] + (f"\n\nInput:\n{fields['input']}" if fields["input"] else "")
        return text, fields["output"]
    if fmt == "completion":
        return fields["prompt"], fields["completion"]
    if fmt == "chat":
        messages = fields["messages"]
        reference = ""
        if messages[-1]["role"] == "assistant":
            reference, messages = messages[-1]["content"], messages[:-1]
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages), reference
    return fields["text"], ""


# --------------------------------------------------------------------------- generation


def _generate_with_model(
    name: str,
    spec: str,
    prompts: Sequence[EvalPrompt],
    *,
    base_model: str | None,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool,
    temperature: float,
    seed: int,
    progress: bool,
    download_dir: Path,
) -> list[str]:
    """Load a model or adapter directory (local or s3://), generate for every prompt, free it."""
    import gc

    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    from kubetune_trainer.data import encode_prompt
    from kubetune_trainer.evaluation.generation import generate_from_ids

    model, tokenizer = load_system(name, spec, base_model=base_model, download_dir=download_dir)
    set_seed(seed)  # sampling (when asked for) gives the same sheet again
    ids = [encode_prompt(tokenizer, p.record, p.format) for p in prompts]
    outputs: list[str] = []
    try:
        with tqdm(total=len(ids), desc=f"generating: {name}", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                outputs += generate_from_ids(
                    model,
                    tokenizer,
                    chunk,
                    max_new_tokens,
                    batch_size,
                    do_sample=do_sample,
                    temperature=temperature,
                )
                bar.update(len(chunk))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return outputs


def load_system(name: str, spec: str, *, base_model: str | None, download_dir: Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a full model or a PEFT adapter directory / s3:// prefix.

    An adapter is put on ``base_model``, or on the base its adapter_config.json records.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.distributed import dist_info
    from kubetune_trainer.models import resolve_model_path
    from kubetune_trainer.serve.sources import SourceError, materialize

    what = f"system {name!r}"
    try:
        path = materialize(str(spec), what, download_dir=download_dir)
    except SourceError as exc:
        text = str(exc) if str(exc).startswith(what) else f"{what}: {exc}"
        raise HumanEvalError(
            f"{text}; give a model or adapter directory (or s3:// prefix) per system"
        ) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = (path / "adapter_config.json").is_file()
    if not adapter and not (path / "config.json").is_file():
        raise HumanEvalError(
            f"{what}: {spec} holds neither config.json (a model) nor adapter_config.json (an adapter); "
            "point at a training's output_dir or a model directory"
        )
    if adapter:
        recorded = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        base = base_model or recorded
        if not base:
            raise HumanEvalError(f"{what}: the adapter does not record its base model: pass --base-model DIR")
        base_path = resolve_model_path(base, dist_info())
    else:
        base_path = str(path)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    log.info("%s: loading %s%s", what, base_path, f" + adapter {spec}" if adapter else "")
    model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    csv: Path
    jsonl: Path
    key: Path
    items: int
    systems: tuple[str, ...]


def sheet_columns(slots: Sequence[str], rating: str, include_reference: bool) -> list[str]:
    cols = ["item", "prompt"] + (["reference"] if include_reference else [])
    for s in slots:
        cols.append(f"output_{s}")
        if rating in ("score", "both"):
            cols.append(f"score_{s}")
    if rating in ("preference", "both"):
        cols.append("preference")
    return [*cols, "comment"]


def export_sheet(
    systems: Mapping[str, SystemSpec],
    dataset: str | os.PathLike[str] | Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    rating: str | None = None,
    scale: tuple[int, int] = DEFAULT_SCALE,
    max_prompts: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    base_model: str | None = None,
    data_format: str = "auto",
    include_reference: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    progress: bool = True,
) -> ExportResult:
    """Generate every system's output for the prompts and write the blind sheet and its key.

    ``rating``: "score" (each output rated on ``scale``), "preference" (which of two outputs is
    better, or tie) or "both"; default "both" for two systems, "score" for more.
    """
    names = list(systems)
    rating = _check_export(names, rating, scale, max_prompts, max_new_tokens, batch_size)
    prompts = load_prompts(dataset, data_format)
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    if max_prompts is not None:
        order = order[:max_prompts]
    chosen = [prompts[i] for i in order]
    slots = list(SLOT_LETTERS[: len(names)])
    # Slot orders are drawn before any generation, so the same seed gives the same layout.
    assignments = [dict(zip(slots, rng.sample(names, len(names)), strict=True)) for _ in chosen]

    outputs: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-human-eval-") as download_dir:
        for name in names:
            spec = systems[name]
            if callable(spec):
                from tqdm.auto import tqdm

                outputs[name] = [
                    str(spec(p.text))
                    for p in tqdm(chosen, desc=f"generating: {name}", unit="prompt", disable=not progress)
                ]
            else:
                outputs[name] = _generate_with_model(
                    name,
                    str(spec),
                    chosen,
                    base_model=base_model,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    do_sample=do_sample,
                    temperature=temperature,
                    seed=seed,
                    progress=progress,
                    download_dir=Path(download_dir),
                )

    columns = sheet_columns(slots, rating, include_reference)
    rows: list[dict[str, Any]] = []
    key_items: dict[str, Any] = {}
    for n, (prompt, assignment) in enumerate(zip(chosen, assignments, strict=True), start=1):
        row: dict[str, Any] = dict.fromkeys(columns)
        row.update(item=n, prompt=prompt.text, comment="")
        if include_reference:
            row["reference"] = prompt.reference
        for slot, name in assignment.items():
            row[f"output_{slot}"] = outputs[name][n - 1]
        rows.append(row)
        key_items[str(n)] = {
            "source_line": prompt.source_line,
            "prompt_sha256": _digest(prompt.text),
            "slots": assignment,
        }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / SHEET_CSV).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    with (out / SHEET_JSONL).open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    key = {
        "format": KEY_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset": str(dataset) if isinstance(dataset, str | os.PathLike) else "<records>",
        "seed": seed,
        "rating": rating,
        "scale": list(scale),
        "systems": {
            n: (str(s) if not callable(s) else f"<function {getattr(s, '__name__', 'generate')}>")
            for n, s in systems.items()
        },
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature},
        "slots": slots,
        "items": key_items,
    }
    (out / KEY_FILE).write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ExportResult(out / SHEET_CSV, out / SHEET_JSONL, out / KEY_FILE, len(rows), tuple(names))


def _check_export(
    names: list[str],
    rating: str | None,
    scale: tuple[int, int],
    max_prompts: int | None,
    max_new_tokens: int,
    batch_size: int,
) -> str:
    if len(names) < 2:
        raise HumanEvalError(f"systems: got {len(names)}; a comparison needs at least two (name=path pairs)")
    if len(names) > len(SLOT_LETTERS):
        raise HumanEvalError(f"systems: at most {len(SLOT_LETTERS)} per sheet, got {len(names)}")
    for name in names:
        if not name or not name.strip():
            raise HumanEvalError("systems: a system has an empty name; give each one as NAME=PATH")
    rating = rating or ("both" if len(names) == 2 else "score")
    if rating not in RATINGS:
        raise HumanEvalError(f"rating {rating!r} is not one of {', '.join(RATINGS)}")
    if rating != "score" and len(names) != 2:
        raise HumanEvalError(
            f"rating {rating!r} asks raters which of two outputs is better, but there are {len(names)} "
            "systems: use rating 'score', or compare two systems per sheet"
        )
    lo, hi = scale
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo >= hi:
        raise HumanEvalError(f"scale {lo}-{hi}: give two whole numbers, the lower first (e.g. 1-5)")
    if max_prompts is not None and max_prompts < 1:
        raise HumanEvalError(f"max_prompts {max_prompts}: give at least 1 (or leave it unset for all)")
    if max_new_tokens < 1 or batch_size < 1:
        raise HumanEvalError("max_new_tokens and batch_size must be at least 1")
    return rating


def _digest(text: str) -> str:
    """A short hash of a prompt, blind to whitespace (spreadsheets rewrite line ends)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()[:16]


def parse_scale(text: str) -> tuple[int, int]:
    """ "1-5" -> (1, 5)."""
    try:
        lo, hi = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise HumanEvalError(f"scale {text!r}: write it as LOW-HIGH, e.g. 1-5") from None
    return lo, hi


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class Judgement:
    """One filled-in sheet row, mapped back to systems through the key."""

    item: int
    scores: dict[str, int]  # system -> score (empty when only preferences were asked for)
    preferred: str | None  # system name, TIE, or None when no preference was asked for
    where: str  # "sheet.csv, row 3" for messages


@dataclass(frozen=True)
class SystemStats:
    name: str
    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    std: float | None
    wins: float  # comparisons won (ties count half) against every other system
    comparisons: int

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.comparisons if self.comparisons else None


@dataclass(frozen=True)
class PairStats:
    system: str
    other: str
    n: int
    wins: int
    losses: int
    ties: int
    win_rate: float  # of ``system`` over ``other``, ties half
    ci_low: float
    ci_high: float


@dataclass
class HumanEvalResult:
    rating: str
    scale: tuple[int, int]
    items: int  # distinct items rated
    judgements: int  # rows over all sheets
    sheets: list[str]
    systems: dict[str, SystemStats]
    pairs: list[PairStats] = field(default_factory=list)
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        def stats(s: SystemStats) -> dict[str, Any]:
            return {
                "n": s.n,
                "mean_score": s.mean,
                "mean_score_ci": [s.ci_low, s.ci_high] if s.ci_low is not None else None,
                "std": s.std,
                "win_rate": s.win_rate,
                "comparisons": s.comparisons,
            }

        return {
            "rating": self.rating,
            "scale": list(self.scale),
            "confidence": self.confidence,
            "items": self.items,
            "judgements": self.judgements,
            "sheets": self.sheets,
            "systems": {name: stats(s) for name, s in self.systems.items()},
            "pairwise": [
                {
                    "system": p.system,
                    "other": p.other,
                    "n": p.n,
                    "wins": p.wins,
                    "losses": p.losses,
                    "ties": p.ties,
                    "win_rate": p.win_rate,
                    "win_rate_ci": [p.ci_low, p.ci_high],
                }
                for p in self.pairs
            ],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def summary(self) -> str:
        pct = round(self.confidence * 100)
        lines = [
            f"{self.judgements} ratings of {self.items} items ({self.rating}, scale {self.scale[0]}-{self.scale[1]})"
        ]
        width = max(len("system"), *(len(n) for n in self.systems))
        if any(s.mean is not None for s in self.systems.values()):
            lines += ["", f"{'system':<{width}}  {'n':>4}  {'mean':>6}  {pct}% CI"]
            for s in sorted(self.systems.values(), key=lambda s: -(s.mean or 0)):
                ci = f"[{s.ci_low:.2f}, {s.ci_high:.2f}]" if s.ci_low is not None else "(needs 2+ ratings)"
                mean = f"{s.mean:.2f}" if s.mean is not None else "-"
                lines.append(f"{s.name:<{width}}  {s.n:>4}  {mean:>6}  {ci}")
        if self.pairs:
            lines += [
                "",
                f"{'pair':<{2 * width + 4}}  {'n':>4}  {'W-T-L':>9}  {'win rate':>8}  {pct}% CI (Wilson)",
            ]
            for p in self.pairs:
                pair = f"{p.system} vs {p.other}"
                wtl = f"{p.wins}-{p.ties}-{p.losses}"
                lines.append(
                    f"{pair:<{2 * width + 4}}  {p.n:>4}  {wtl:>9}  {p.win_rate:>8.3f}  [{p.ci_low:.3f}, {p.ci_high:.3f}]"
                )
        return "\n".join(lines)


def import_ratings(
    sheets: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    key: str | os.PathLike[str],
    *,
    skip_unrated: bool = False,
    confidence: float = CONFIDENCE,
) -> HumanEvalResult:
    """Read filled-in sheets (CSV or JSONL, one per rater) with their key and compute the statistics.

    Every row must be rated; ``skip_unrated`` drops rows whose rating cells are all blank instead
    (a rater who did not finish).
    """
    paths = [Path(sheets)] if isinstance(sheets, str | os.PathLike) else [Path(s) for s in sheets]
    if not paths:
        raise HumanEvalError("no sheet given: pass the filled-in sheet.csv or sheet.jsonl")
    key_data = read_key(Path(key))
    judgements: list[Judgement] = []
    for path in paths:
        judgements += _read_sheet(path, key_data, skip_unrated)
    if not judgements:
        raise HumanEvalError(f"{', '.join(map(str, paths))}: no rated rows: fill in the rating columns first")
    return compute_statistics(judgements, key_data, [str(p) for p in paths], confidence)


def read_key(path: Path) -> dict[str, Any]:
    fix = f"pass the {KEY_FILE} that `kubetune eval export` wrote next to the sheet"
    if not path.is_file():
        raise HumanEvalError(f"key file {path} does not exist: {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HumanEvalError(f"key file {path} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
        raise HumanEvalError(f"key file {path} is not a human-evaluation key (format {KEY_FORMAT}): {fix}")
    for name in ("rating", "scale", "systems", "slots", "items"):
        if name not in data:
            raise HumanEvalError(f"key file {path} lacks {name!r}: it was edited or cut short; {fix}")
    return data


def _read_sheet(path: Path, key: dict[str, Any], skip_unrated: bool) -> list[Judgement]:
    if not path.is_file():
        raise HumanEvalError(f"sheet {path} does not exist: pass the filled-in {SHEET_CSV} or {SHEET_JSONL}")
    rating, slots = key["rating"], key["slots"]
    lo, hi = key["scale"]
    rows = list(_sheet_rows(path))
    if not rows:
        raise HumanEvalError(f"{path}: the sheet has no rows: give the filled-in sheet that export wrote")
    needed = ["item"] + ([f"score_{s}" for s in slots] if rating in ("score", "both") else [])
    needed += ["preference"] if rating in ("preference", "both") else []
    present = set().union(*(set(r) for _, r in rows))
    for col in needed:
        if col not in present:
            raise HumanEvalError(
                f"{path}: column {col!r} is missing: keep the sheet's columns as exported "
                f"(this key asks for {', '.join(needed[1:])})"
            )
    seen: dict[int, str] = {}
    out = []
    for where, row in rows:
        item = _item(row.get("item"), where, key)
        if item in seen:
            raise HumanEvalError(
                f"{where}: item {item} appears twice in the sheet (also {seen[item]}): delete one"
            )
        seen[item] = where
        entry = key["items"][str(item)]
        if (
            "prompt" in row
            and row["prompt"] not in (None, "")
            and _digest(str(row["prompt"])) != entry["prompt_sha256"]
        ):
            raise HumanEvalError(
                f"{where}, column 'prompt': not the prompt item {item} had when exported: the sheet and key "
                "do not belong together, or rows were edited; use the key written with this sheet"
            )
        cells = [row.get(c) for c in needed[1:]]
        if skip_unrated and all(_blank(c) for c in cells):
            continue
        scores = {}
        if rating in ("score", "both"):
            for slot in slots:
                scores[entry["slots"][slot]] = _score(
                    row.get(f"score_{slot}"), f"{where}, column 'score_{slot}'", lo, hi
                )
        preferred = None
        if rating in ("preference", "both"):
            choice = _preference(row.get("preference"), f"{where}, column 'preference'", slots)
            preferred = TIE if choice == TIE else entry["slots"][choice]
        out.append(Judgement(item, scores, preferred, where))
    missing = sorted(set(map(int, key["items"])) - set(seen))
    if missing and not skip_unrated:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise HumanEvalError(
            f"{path}: items {shown} of the key are not in the sheet: restore those rows, "
            "or import with --skip-unrated to rate a subset"
        )
    return out


def _sheet_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    """(where, row) for every row: "FILE, row N" as a spreadsheet numbers it, "FILE, line N" for JSONL."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HumanEvalError(
            f"{path}: not UTF-8 text ({exc.reason}): save the sheet as UTF-8 CSV or JSONL"
        ) from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for n, row in enumerate(reader, start=2):  # row 1 is the header
            if None in row:
                raise HumanEvalError(
                    f"{path}, row {n}: more cells than columns: quote cells that contain commas"
                )
            yield f"{path}, row {n}", row
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HumanEvalError(
                    f"{path}, line {n}: invalid JSON ({exc.msg}): one object per line"
                ) from None
            if not isinstance(row, dict):
                raise HumanEvalError(f"{path}, line {n}: expected a JSON object per line")
            yield f"{path}, line {n}", row
    else:
        raise HumanEvalError(
            f"{path}: unsupported sheet type {suffix or '(none)'!r}: give the .csv or .jsonl sheet"
        )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _item(value: Any, where: str, key: dict[str, Any]) -> int:
    try:
        item = int(str(value).strip())
    except ValueError:
        raise HumanEvalError(
            f"{where}, column 'item': {value!r} is not an item number: keep the exported item column"
        ) from None
    if str(item) not in key["items"]:
        raise HumanEvalError(
            f"{where}, column 'item': item {item} is not in the key: use the key written with this sheet"
        )
    return item


def _score(value: Any, where: str, lo: int, hi: int) -> int:
    fix = f"enter a whole number from {lo} to {hi}"
    if _blank(value):
        raise HumanEvalError(f"{where}: the rating is missing: {fix}")
    try:
        number = float(str(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise HumanEvalError(f"{where}: {value!r} is not a number: {fix}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number):
        raise HumanEvalError(f"{where}: {value!r} is not a whole number: {fix}")
    if not lo <= number <= hi:
        raise HumanEvalError(f"{where}: {value!r} is out of range {lo}-{hi}: {fix}")
    return int(number)


def _preference(value: Any, where: str, slots: Sequence[str]) -> str:
    allowed = [*slots, TIE]
    fix = f"enter one of {', '.join(allowed)}"
    if _blank(value):
        raise HumanEvalError(f"{where}: the preference is missing: {fix}")
    choice = str(value).strip()
    if choice.lower() == TIE:
        return TIE
    if choice.upper() in slots:
        return choice.upper()
    raise HumanEvalError(f"{where}: {value!r} is not a slot of this sheet: {fix}")


# --------------------------------------------------------------------------- statistics


def mean_confidence_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float] | None:
    """(mean, low, high): Student's t-interval of the mean; None for fewer than two values."""
    import numpy as np
    from scipy import stats

    if len(values) < 2:
        return None
    arr = np.asarray(values, dtype=float)
    mean, sem = float(arr.mean()), float(stats.sem(arr))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(arr) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion; ``successes`` may be fractional (ties counted half)."""
    from scipy import stats

    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def compute_statistics(
    judgements: Sequence[Judgement], key: dict[str, Any], sheets: list[str], confidence: float = CONFIDENCE
) -> HumanEvalResult:
    import numpy as np

    names = list(key["systems"])
    rating = key["rating"]
    # Pairwise outcomes come from the preference when raters gave one, else from the scores.
    outcomes: dict[tuple[str, str], list[float]] = {pair: [] for pair in itertools.combinations(names, 2)}
    for j in judgements:
        for a, b in outcomes:
            if j.preferred is not None:
                outcome = 0.5 if j.preferred == TIE else 1.0 if j.preferred == a else 0.0
            else:
                sa, sb = j.scores[a], j.scores[b]
                outcome = 0.5 if sa == sb else 1.0 if sa > sb else 0.0
            outcomes[(a, b)].append(outcome)
    pairs = []
    wins = dict.fromkeys(names, 0.0)
    comparisons = dict.fromkeys(names, 0)
    for (a, b), values in outcomes.items():
        n = len(values)
        won, lost = values.count(1.0), values.count(0.0)
        tied = n - won - lost
        successes = won + 0.5 * tied
        low, high = wilson_interval(successes, n, confidence)
        pairs.append(PairStats(a, b, n, won, lost, tied, successes / n, low, high))
        wins[a] += successes
        wins[b] += n - successes
        comparisons[a] += n
        comparisons[b] += n
    systems = {}
    for name in names:
        scores = [j.scores[name] for j in judgements if name in j.scores]
        ci = mean_confidence_interval(scores, confidence)
        mean = float(np.mean(scores)) if scores else None
        std = float(np.std(scores, ddof=1)) if len(scores) > 1 else None
        systems[name] = SystemStats(
            name,
            len(scores),
            mean,
            ci[1] if ci else None,
            ci[2] if ci else None,
            std,
            wins[name],
            comparisons[name],
        )
    return HumanEvalResult(
        rating=rating,
        scale=(int(key["scale"][0]), int(key["scale"][1])),
        items=len({j.item for j in judgements}),
        judgements=len(judgements),
        sheets=sheets,
        systems=systems,
        pairs=pairs,
        confidence=confidence,
    )
