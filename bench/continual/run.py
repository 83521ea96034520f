"""Forgetting in the guide's continual-learning loop: no replay, replay, and replay + EWC.

Three generated tasks share their inputs (three of six colour words) and differ in instruction
and answer: each maps the colours to its own code words, so learning task 2 overwrites what
task 1 needs unless something holds it. Task 1 is trained once (the quickstart's tiny model, a
LoRA adapter in ``<out>/task-1/``); each strategy then continues that adapter
(``init_adapter``) with one ``ModelFinetuner`` through the guide's loop,
``for task in new_tasks: finetuner.train(task_data, replay_buffer=old_data)``, and task 1's
held-out exact match is measured after every task. Each task's adapter is kept: task 2 in
``<out>/<strategy>/`` (the finetuner's first train()), task 3 in ``<out>/<strategy>/task-2/``
(its second: run directories count a finetuner's train() calls).

    PYTHONPATH=trainer-image python bench/continual/run.py
    PYTHONPATH=trainer-image python bench/continual/run.py --steps 60 --strategies none replay
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

TASKS = (
    ("Translate the colours into code words.", 0),
    ("Translate the colours into secret words.", 6),
    ("Translate the colours into hidden words.", 3),
)
STRATEGIES = ("none", "replay", "ewc")


COLOURS = 6  # the first six of the quickstart's colours: a task is learned in a few hundred steps


def task_inputs(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sequences of three of the first COLOURS colours."""
    import random

    from kubetune_trainer.quickstart import COLOURS as NAMES

    rng = random.Random(seed)
    every = [f"{a} {b} {c}" for a in NAMES[:COLOURS] for b in NAMES[:COLOURS] for c in NAMES[:COLOURS]]
    if n > len(every):
        raise SystemExit(f"at most {len(every)} examples per task (train + test)")
    return rng.sample(every, n)


def task_records(inputs: list[str], task: int) -> list[dict[str, str]]:
    """The records of task ``task``: its instruction, and CODES rotated by its offset as codebook."""
    from kubetune_trainer.quickstart import CODES, COLOURS

    instruction, offset = TASKS[task]
    book = {c: CODES[(i + offset) % len(CODES)] for i, c in enumerate(COLOURS)}
    return [
        {"instruction": instruction, "input": x, "output": " ".join(book[w] for w in x.split())}
        for x in inputs
    ]


def make_config(model_dir: Path, output_dir: Path, train_file: Path, steps: int, args: Any, **kw: Any) -> Any:
    from kubetune_trainer import FinetuningConfig

    return FinetuningConfig(
        model_name=str(model_dir),
        output_dir=str(output_dir),
        train_file=str(train_file),
        method="lora",
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_ratio=0.05,
        group_by_length=False,
        max_seq_length=128,
        metrics=["exact_match"],
        eval_max_new_tokens=16,
        logging_steps=50,
        progress_bar=False,
        resume="never",
        replay_fraction=args.replay_fraction,
        seed=0,
        **kw,
    )


def evaluate(ft: Any, test: list[list[dict]], tasks: int) -> dict[str, float]:
    return {f"task{k + 1}": ft.test(test[k])["test_exact_match"] for k in range(tasks)}


def train_first_task(model_dir: Path, out: Path, test: list[list[dict]], args: Any) -> tuple[Path, dict]:
    from kubetune_trainer import ModelFinetuner

    ft = ModelFinetuner(
        make_config(model_dir, out / "task-1", out / "data" / "task-1.jsonl", args.first_steps, args)
    )
    t0 = time.monotonic()
    try:
        ft.train()
        row = evaluate(ft, test, 1) | {"seconds": time.monotonic() - t0}
        adapter = ft.save_model()
    finally:
        ft.close()
    print(
        f"  task 1 ({args.first_steps} steps): " + json.dumps({k: round(v, 2) for k, v in row.items()}),
        flush=True,
    )
    return adapter, row


def run_strategy(
    strategy: str,
    model_dir: Path,
    adapter: Path,
    out: Path,
    train: list[list[dict]],
    test: list[list[dict]],
    args: Any,
) -> list[dict[str, float]]:
    """Continue task 1's adapter through tasks 2, 3, ...; after each, exact match on every task so far."""
    from kubetune_trainer import ModelFinetuner

    config = make_config(
        model_dir,
        out / strategy,
        out / "data" / "task-2.jsonl",
        args.steps,
        args,
        init_adapter=str(adapter),
        ewc_lambda=args.ewc_lambda if strategy == "ewc" else 0.0,
    )
    ft = ModelFinetuner(config)
    rows: list[dict[str, float]] = []
    seen: list[dict] = list(train[0])
    try:
        for n, records in enumerate(train[1:], start=1):  # the guide's loop over the new tasks
            t0 = time.monotonic()
            ft.train(records, replay_buffer=None if strategy == "none" else list(seen))
            row = evaluate(ft, test, n + 1) | {"seconds": time.monotonic() - t0}
            rows.append(row)
            print(
                f"  {strategy:<7} after task {n + 1}: "
                + json.dumps({k: round(v, 2) for k, v in row.items()}),
                flush=True,
            )
            seen += records
        ft.save_model()
    finally:
        ft.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="continual-bench", help="work directory (model, data, adapters)")
    p.add_argument("--first-steps", type=int, default=200, help="optimizer steps of task 1")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each later task")
    p.add_argument("--train-examples", type=int, default=160, help="training examples per task")
    p.add_argument("--test-examples", type=int, default=50, help="held-out examples per task")
    p.add_argument("--replay-fraction", type=float, default=0.3, help="share of replay in each later task")
    p.add_argument("--ewc-lambda", type=float, default=1e4, help="EWC strength (strategy ewc)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    args = p.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from kubetune_trainer.tiny_model import make_tiny_model

    out = Path(args.out).resolve()
    model_dir = make_tiny_model(out / "tiny-model", initializer_range=0.1)  # quickstart's model
    inputs = task_inputs(args.train_examples + args.test_examples)
    train_in, test_in = inputs[: args.train_examples], inputs[args.train_examples :]
    train = [task_records(train_in, t) for t in range(len(TASKS))]
    test = [task_records(test_in, t) for t in range(len(TASKS))]
    (out / "data").mkdir(parents=True, exist_ok=True)
    for t, rows in enumerate(train):
        (out / "data" / f"task-{t + 1}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(
        f"{len(TASKS)} tasks ({args.first_steps} steps, then {args.steps} per task), {args.train_examples} training "
        f"and {args.test_examples} held-out examples per task; replay fraction {args.replay_fraction}, "
        f"EWC lambda {args.ewc_lambda:g}",
        flush=True,
    )
    start = time.monotonic()
    adapter, first = train_first_task(model_dir, out, test, args)
    results = {
        s: [first, *run_strategy(s, model_dir, adapter, out, train, test, args)] for s in args.strategies
    }

    print("\ntask 1 held-out exact match after each task (and the newest task's own):")
    print(
        f"  {'strategy':<16}"
        + "".join(f"{'after task ' + str(n + 1):>14}" for n in range(len(TASKS)))
        + f"{'newest task':>14}"
    )
    for s, rows in results.items():
        label = {"none": "no replay", "replay": f"replay {args.replay_fraction:g}", "ewc": "replay + EWC"}[s]
        cells = "".join(f"{r['task1']:>14.2f}" for r in rows)
        newest = rows[-1][f"task{len(rows)}"]
        print(f"  {label:<16}{cells}{newest:>14.2f}")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(
        f"\n{time.monotonic() - start:.0f} s; adapters: task 1 in {out}/task-1/, task 2 in {out}/<strategy>/, "
        f"task 3 in {out}/<strategy>/task-2/; numbers in {out}/results.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
