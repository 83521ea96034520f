"""``kubetune eval export`` / ``kubetune eval import``: the human-evaluation loop on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path


def _system(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a system as NAME=PATH (a model or adapter directory, or s3://)"
        )
    return name.strip(), spec.strip()


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="human evaluation: export a blind rating sheet, import the ratings",
        description="Compare models or adapters by human ratings: `eval export` writes a blind sheet, "
        "`eval import` reads it back with its key and reports mean scores and win rates.",
    )
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")
    _register_export(eval_sub)
    _register_import(eval_sub)


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="generate each system's outputs and write sheet.csv, sheet.jsonl and key.json",
        description="Generate every system's answer to the prompts of DATA and write a blind sheet "
        "(rows and output slots shuffled with --seed) plus key.json, which maps slots to systems. "
        "Give raters sheet.csv or sheet.jsonl; keep key.json.",
    )
    p.add_argument("--data", required=True, help="prompt file (JSON, JSONL, CSV or Parquet; local or s3://)")
    p.add_argument(
        "--system",
        dest="systems",
        action="append",
        type=_system,
        required=True,
        metavar="NAME=PATH",
        help="a model or adapter directory (or s3:// prefix); repeat for each system (two or more)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--base-model", help="base model for the adapters (default: the one each adapter records)")
    p.add_argument(
        "--rating", choices=["score", "preference", "both"], help="default: both for 2 systems, else score"
    )
    p.add_argument("--scale", default="1-5", help="score scale LOW-HIGH (default 1-5)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (the same seed gives the same sheet)")
    p.add_argument("--max-prompts", type=int, help="rate a seeded random sample of this many prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", default="auto", help="data format (default: detected from the first record)")
    p.add_argument(
        "--include-reference", action="store_true", help="show the data's reference answer to raters"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding; >0 samples")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.evaluation.human import HumanEvalError, export_sheet, parse_scale

        names = [name for name, _ in args.systems]
        if len(set(names)) != len(names):
            raise HumanEvalError(f"--system: the names {names} repeat; give each system its own name")
        result = export_sheet(
            dict(args.systems),
            args.data,
            args.out,
            seed=args.seed,
            rating=args.rating,
            scale=parse_scale(args.scale),
            max_prompts=args.max_prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            base_model=args.base_model,
            data_format=args.format,
            include_reference=args.include_reference,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0,
        )
        print(f"{result.items} items x {len(result.systems)} systems written:")
        print(f"  give raters: {result.csv}  (or {result.jsonl})")
        print(f"  keep hidden: {result.key}")
        print(f"then: kubetune eval import {result.csv} --key {result.key}")
        return 0

    p.set_defaults(func=run)


def _register_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="read filled-in sheets with their key; report mean scores and win rates (95%% intervals)",
        description="Read one or more filled-in sheets (one per rater, CSV or JSONL) and the key "
        "written by `eval export`; print per system the mean score with a 95% t-interval and per "
        "pair the win rate (ties count half) with a 95% Wilson interval.",
    )
    p.add_argument("sheets", nargs="+", type=Path, help="filled-in sheet.csv / sheet.jsonl files")
    p.add_argument("--key", type=Path, required=True, help="the key.json written with the sheet")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--skip-unrated", action="store_true", help="ignore rows left blank (default: an error)")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.evaluation.human import import_ratings

        result = import_ratings(args.sheets, args.key, skip_unrated=args.skip_unrated)
        print(result.summary())
        if args.json:
            result.to_json(args.json)
            print(f"\nresults written to {args.json}")
        return 0

    p.set_defaults(func=run)
