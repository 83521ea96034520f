"""The ``kubetune`` command line.

One small function per subcommand: ``_cmd_<name>(sub)`` adds its parser and sets
``func``; add it to ``COMMANDS``. Heavy imports (torch, transformers, kubernetes) happen
inside the handlers so ``kubetune --help`` is instant.

Errors end the process with the codes of :mod:`kubetune_trainer.exit_codes` and a one-line
message (no stack trace) for the errors a user can fix: bad config (2), bad data (3),
unsupported hardware (4). Unexpected errors print the traceback and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from kubetune_trainer.exit_codes import ExitCode, TrainerError, exit_code_for

log = logging.getLogger("kubetune")


# --------------------------------------------------------------------------- commands


def _cmd_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="build a small random Llama model + BPE tokenizer (no model hub needed)",
        description="Build a small random-weight Llama-architecture model and a byte-level BPE "
        "tokenizer into DIR, loadable with AutoModelForCausalLM/AutoTokenizer.",
    )
    p.add_argument("dir", type=Path, help="output directory")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-range",
        type=float,
        default=0.02,
        help="weight init std (0.1 lets LoRA-tuned tiny models get confident)",
    )

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.tiny_model import make_tiny_model

        try:
            out = make_tiny_model(
                args.dir,
                vocab_size=args.vocab_size,
                hidden_size=args.hidden_size,
                num_layers=args.layers,
                num_heads=args.heads,
                num_kv_heads=args.kv_heads,
                initializer_range=args.init_range,
                seed=args.seed,
            )
        except ValueError as exc:
            raise TrainerError(str(exc), ExitCode.BAD_CONFIG) from exc
        print(f"tiny model written to {out}")
        return 0

    p.set_defaults(func=run)


def _cmd_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train from a FinetuningConfig YAML (what training pods run under torchrun)",
        description="Run one training job from a FinetuningConfig YAML file. In pods: "
        "`torchrun ... -m kubetune_trainer train --config FILE`.",
    )
    p.add_argument("--config", type=Path, required=True, help="FinetuningConfig YAML file")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer import pod

        try:
            from kubetune_trainer.config import FinetuningConfig
            from kubetune_trainer.job import run_training

            result = run_training(FinetuningConfig.from_yaml(args.config))
        except Exception as exc:
            # The operator shows this (pod status); the exit code below decides whether it retries.
            pod.write_error(pod.error_message(exc, expected=exit_code_for(exc) != ExitCode.UNEXPECTED))
            raise
        pod.write_report(pod.report(result))
        return 0

    p.set_defaults(func=run)


def _cmd_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a job file locally (FinetuningConfig YAML or FineTuneJob manifest)",
        description="Run a training job on this machine. FILE is a FinetuningConfig YAML or a "
        "FineTuneJob manifest (kind: FineTuneJob).",
    )
    p.add_argument("file", type=Path, help="FinetuningConfig YAML or FineTuneJob manifest")
    p.add_argument(
        "--local", action="store_true", required=True, help="run here rather than on a cluster (required)"
    )
    p.add_argument("--output-dir", type=Path, help="override output_dir")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.job import run_training
        from kubetune_trainer.jobfile import load_job_file

        config = load_job_file(args.file)
        if args.output_dir:
            config = config.model_copy(update={"output_dir": str(args.output_dir)})
        run_training(config)
        return 0

    p.set_defaults(func=run)


def _cmd_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a FineTuneSweep manifest's trials locally (hyperparameter search)",
        description="Run the trials of a FineTuneSweep manifest on this machine, one after another, "
        "printing each trial as it finishes and the results best first (docs/sweeps.md).",
    )
    p.add_argument("file", type=Path, help="FineTuneSweep manifest (kind: FineTuneSweep)")
    p.add_argument(
        "--local", action="store_true", required=True, help="run here rather than on a cluster (required)"
    )
    p.add_argument("--output-dir", type=Path, help="where trial directories and results go")
    p.add_argument("--max-trials", type=int, help="override spec.maxTrials")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.search.cli import run_sweep

        return run_sweep(args.file, output_dir=args.output_dir, max_trials=args.max_trials)

    p.set_defaults(func=run)


def _cmd_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="fine-tune a LoRA adapter on a generated task on CPU and show before/after metrics",
    )
    p.add_argument("--workdir", type=Path, default=Path("quickstart-output"), help="where files go")
    p.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.quickstart import run_quickstart

        return run_quickstart(args.workdir, max_steps=args.max_steps)

    p.set_defaults(func=run)


def _cmd_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a run's loss and evaluation curves as a PNG",
        description="Draw training/validation loss, learning rate and evaluation metrics per step from a "
        "run's log_history.json (or a checkpoint's trainer_state.json). SOURCE is a run's output "
        "directory or the s3:// URI of its final/ prefix (S3 credentials from the usual AWS_* variables).",
    )
    p.add_argument("source", help="run directory, checkpoint directory or s3://bucket/.../final/")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="PNG to write (default: training_curves.png in SOURCE, or in the current directory for s3://)",
    )
    p.add_argument("--title", help="title above the panels (default: SOURCE)")

    def run(args: argparse.Namespace) -> int:
        from kubetune_trainer.plots import CURVES_FILE, load_log_history, plot_training_curves

        history = load_log_history(args.source)
        local = not args.source.startswith("s3://") and Path(args.source).is_dir()
        out = args.output or (Path(args.source) / CURVES_FILE if local else Path(CURVES_FILE))
        try:
            plot_training_curves(history, out, title=args.title or args.source)
        except ValueError as exc:
            raise TrainerError(f"{args.source}: {exc}", ExitCode.BAD_CONFIG) from exc
        print(f"training curves written to {out}")
        return 0

    p.set_defaults(func=run)


def _cmd_operator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the kubetune operator (needs the `operator` extra)")
    try:
        # A launcher only: the operator is imported when the CLI is built, never by the library.
        from kubetune_operator.main import add_arguments, run
    except ImportError:  # an image without the operator package
        return
    add_arguments(p)
    p.set_defaults(func=run)


def _cmd_serve(sub: argparse._SubParsersAction) -> None:
    from kubetune_trainer.serve.cli import register_serve

    register_serve(sub)


def _cmd_fetch(sub: argparse._SubParsersAction) -> None:
    from kubetune_trainer.serve.cli import register_fetch

    register_fetch(sub)


def _cmd_adapter_sync(sub: argparse._SubParsersAction) -> None:
    from kubetune_trainer.serve.cli import register_adapter_sync

    register_adapter_sync(sub)


def _cmd_eval(sub: argparse._SubParsersAction) -> None:
    from kubetune_trainer.evaluation.human_cli import register_eval

    register_eval(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _cmd_make_tiny_model,
    _cmd_train,
    _cmd_run,
    _cmd_sweep,
    _cmd_quickstart,
    _cmd_plot,
    _cmd_serve,
    _cmd_fetch,
    _cmd_adapter_sync,
    _cmd_eval,
    _cmd_operator,
]


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="kubetune: fine-tune and serve LLM adapters"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun only global rank 0 logs progress; the other ranks report problems only.
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:
        code = int(exit_code_for(exc))
        if code == ExitCode.UNEXPECTED or args.verbose:
            traceback.print_exc()
        print(f"kubetune {args.command}: error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
