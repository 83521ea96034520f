"""Training curves: ``training_curves.png`` from a run's log history (matplotlib, no display needed).

Every run saves the Trainer's log history (``trainer.state.log_history``: one record per log
event, e.g. ``{"step": 10, "loss": 2.1, "learning_rate": 1e-4}`` or ``{"step": 10, "eval_loss":
2.3, "eval_perplexity": 9.9}``) as ``log_history.json`` next to the adapter, and draws it:

* loss: training loss and validation loss per step (the test loss as a last point);
* learning rate per step;
* one panel per other evaluation metric (perplexity, exact_match, rouge1 ...).

``kubetune plot RUN_DIR|s3://.../final/`` draws the same picture again from a saved run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.exit_codes import ConfigError

LOG_HISTORY_FILE = "log_history.json"
CURVES_FILE = "training_curves.png"
TRAINER_STATE_FILE = "trainer_state.json"
# Trainer's bookkeeping numbers: not curves anyone wants to read.
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_tokens_per_second")
_MAX_METRIC_PANELS = 6


def write_run_curves(out_dir: Path, history: Sequence[dict[str, Any]], title: str) -> Path:
    """Save ``log_history.json`` and draw ``training_curves.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOG_HISTORY_FILE).write_text(json.dumps(list(history), indent=1) + "\n", encoding="utf-8")
    return plot_training_curves(history, out_dir / CURVES_FILE, title=title)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for rec in history:
        value = rec.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(float(rec.get("step", len(xs))))
            ys.append(float(value))
    return xs, ys


def _eval_metrics(history: Sequence[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for rec in history:
        for key, value in rec.items():
            if (
                key.startswith("eval_")
                and key != "eval_loss"
                and not key.endswith(_NOT_METRICS)
                and isinstance(value, int | float)
            ):
                names[key] = None
    return list(names)[:_MAX_METRIC_PANELS]


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Draw the curves of ``history`` into the PNG ``path``; raises ValueError when nothing was logged."""
    # The Figure API with the Agg canvas: no pyplot state, no display, safe in any thread or pod.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train_x, train_y = _series(history, "loss")
    eval_x, eval_y = _series(history, "eval_loss")
    test_x, test_y = _series(history, "test_loss")
    lr_x, lr_y = _series(history, "learning_rate")
    metrics = _eval_metrics(history)
    if not (train_y or eval_y):
        raise ValueError("the log history has no training or validation loss to plot")

    panels = 1 + bool(lr_y) + len(metrics)
    cols = 1 if panels == 1 else 2
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()

    ax = axes[0]
    if train_y:
        ax.plot(train_x, train_y, label="train loss", color="tab:blue", linewidth=1.5)
    if eval_y:
        ax.plot(eval_x, eval_y, label="validation loss", color="tab:orange", marker="o", linewidth=1.5)
    if test_y:
        ax.scatter(test_x, test_y, label="test loss", color="tab:red", marker="*", s=120, zorder=3)
    ax.set_title("loss")
    ax.set_ylabel("loss")
    ax.legend()
    used = 1
    if lr_y:
        ax = axes[used]
        ax.plot(lr_x, lr_y, color="tab:green", linewidth=1.5)
        ax.set_title("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        used += 1
    for name in metrics:
        xs, ys = _series(history, name)
        ax = axes[used]
        ax.plot(xs, ys, color="tab:purple", marker="o", linewidth=1.5)
        ax.set_title(f"validation {name.removeprefix('eval_')}")
        used += 1
    # One step axis for every panel, so an evaluation lines up with the loss at that step.
    steps = [float(r["step"]) for r in history if isinstance(r.get("step"), int | float)]
    last = max(steps, default=0.0)
    for ax in axes[:used]:
        if last > 0:
            ax.set_xlim(0, last * 1.03)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[used:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=100)
    return path


# ----------------------------------------------------------------------------- reading a run


def load_log_history(source: str) -> list[dict[str, Any]]:
    """The log history of a run: a local run directory (or checkpoint) or an ``s3://`` prefix.

    Looks for ``log_history.json`` (every finished run), then ``trainer_state.json`` (a
    checkpoint), then the newest checkpoint under ``checkpoints/`` (a run still training).
    """
    if source.startswith("s3://"):
        return _load_s3(source)
    root = Path(source).expanduser()
    if root.is_file():
        return _parse(root.read_text(encoding="utf-8"), str(root))
    if not root.is_dir():
        raise ConfigError(f"{source}: no such directory; give a run's output directory or an s3:// URI")
    for candidate in (root / LOG_HISTORY_FILE, root / TRAINER_STATE_FILE, _newest_checkpoint_state(root)):
        if candidate is not None and candidate.is_file():
            return _parse(candidate.read_text(encoding="utf-8"), str(candidate))
    raise ConfigError(
        f"{source}: neither {LOG_HISTORY_FILE} nor a checkpoint's {TRAINER_STATE_FILE} is there; give the "
        "output directory of a run (it holds the adapter and log_history.json)"
    )


def _newest_checkpoint_state(root: Path) -> Path | None:
    from kubetune_trainer.storage import checkpoint_step

    folder = root / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(checkpoint_step(p.name), p) for p in folder.iterdir() if p.is_dir()]
    found = sorted((s, p) for s, p in steps if s is not None)
    return found[-1][1] / TRAINER_STATE_FILE if found else None


def _load_s3(source: str) -> list[dict[str, Any]]:
    from kubetune_trainer.storage import S3Uri, s3_client_from_env
    from kubetune_trainer.storage.objects import get_bytes

    client = s3_client_from_env()
    base = source if source.endswith(".json") else source.rstrip("/") + "/"
    tried = (
        [base] if source.endswith(".json") else [base + LOG_HISTORY_FILE, base + f"final/{LOG_HISTORY_FILE}"]
    )
    for uri in tried:
        body = get_bytes(client, S3Uri.parse(uri, field="plot source"))
        if body is not None:
            return _parse(body.decode("utf-8"), uri)
    raise ConfigError(
        f"{source}: no {LOG_HISTORY_FILE} there (tried {', '.join(tried)}); give the final/ prefix of a "
        "finished run, e.g. the adapterUri in the FineTuneJob's status"
    )


def _parse(text: str, where: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    history = doc.get("log_history") if isinstance(doc, dict) else doc
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ConfigError(f"{where}: expected a list of log records (a Trainer log history)")
    return history
