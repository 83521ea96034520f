"""transformers TrainerCallbacks: S3 checkpoint upload, SIGTERM preemption, progress reporting.

All three are meant to be installed on EVERY rank: they synchronise ranks where needed
(barriers around uploads, a shared preemption flag) and act on the right rank themselves
(node leaders upload, global rank 0 writes the manifest and reports progress).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from .progress import ProgressReporter
from .storage import CheckpointStore, StorageError

if TYPE_CHECKING:
    from .config import FinetuningConfig
    from .distributed import DistInfo

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what Kubernetes reports for a terminated container


def _dist() -> Any | None:
    """torch.distributed when a multi-process group is up, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _nodes_from_env(world_size: int) -> int:
    """Number of nodes under torchrun (WORLD_SIZE / LOCAL_WORLD_SIZE); 1 otherwise."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    except ValueError:
        return 1
    return max(1, world_size // local) if local > 0 else 1


class S3CheckpointCallback(TrainerCallback):
    """After every save, upload ``<output_dir>/checkpoint-<step>`` to S3 and prune old checkpoints.

    Every rank enters a barrier (all ranks have written their files, e.g. ZeRO-3 shards), then the
    first process of each node uploads the node's files; global rank 0 writes the manifest once all
    nodes reported (see storage/checkpoints.py), prunes to ``keep_last`` and tells the reporter.
    A second barrier keeps every rank inside ``on_save`` until the upload is done, so a process
    that stops training right after (preemption) cannot exit, and get the node's other processes
    killed by torchrun, while its leader is still uploading. The process group's timeout (30 min by
    default) must therefore exceed the upload time.

    An upload that fails after its retries is logged and training goes on (the next save uploads
    again; resume uses the newest complete checkpoint); ``fail_on_error=True`` raises instead.
    """

    def __init__(
        self,
        store: CheckpointStore,
        output_dir: str,
        keep_last: int,
        node_rank: int,
        is_global_rank0: bool,
        *,
        num_nodes: int | None = None,
        reporter: ProgressReporter | None = None,
        fail_on_error: bool = False,
    ) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last (checkpointing.keepLast) must be an integer >= 1, got {keep_last!r}")
        if is_global_rank0 and node_rank != 0:
            raise ValueError(f"global rank 0 must run on node 0, got node_rank={node_rank}")
        self.store = store
        self.output_dir = output_dir
        self.keep_last = keep_last
        self.node_rank = node_rank
        self.is_global_rank0 = is_global_rank0
        self.num_nodes = num_nodes
        self.reporter = reporter
        self.fail_on_error = fail_on_error
        self.uploaded_steps: list[int] = []  # completed (manifest written) by this process
        self.failed_steps: list[int] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        checkpoint_dir = Path(args.output_dir or self.output_dir) / f"checkpoint-{step}"
        _barrier()  # every rank has finished writing its part of the checkpoint
        error: Exception | None = None
        try:
            if args.local_process_index == 0:
                self._upload(checkpoint_dir, step, int(args.world_size))
        except (StorageError, OSError) as e:
            error = e
            self.failed_steps.append(step)
            log.error("checkpoint %d was not uploaded: %s", step, e)
        finally:
            _barrier()  # nobody moves on (or exits) before the upload is complete
        if error is not None and self.fail_on_error:
            raise error

    def _upload(self, checkpoint_dir: Path, step: int, world_size: int) -> None:
        num_nodes = self.num_nodes or _nodes_from_env(world_size)
        if checkpoint_dir.is_dir():
            result = self.store.upload(
                checkpoint_dir,
                step,
                self.node_rank,
                write_manifest=self.is_global_rank0,
                num_nodes=num_nodes,
                world_size=world_size,
            )
        elif self.node_rank != 0:
            # This node wrote nothing for this save: report an empty list so rank 0 does not wait.
            log.warning("%s does not exist on node %d: reporting no files", checkpoint_dir, self.node_rank)
            with tempfile.TemporaryDirectory() as empty:
                result = self.store.upload(
                    empty, step, self.node_rank, write_manifest=False, num_nodes=num_nodes
                )
        else:
            raise StorageError(
                f"the Trainer reported a save at step {step}, but {checkpoint_dir} does not exist"
            )
        if not self.is_global_rank0:
            return
        kept = self.store.prune(self.keep_last).kept
        self.uploaded_steps.append(step)
        log.info("checkpoint %d uploaded to %s in %.1fs", step, result.uri, result.seconds)
        if self.reporter is not None:
            self.reporter.checkpoint(result.uri, step, len(kept), upload_seconds=result.seconds)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM: save a checkpoint at the end of the current step, then stop training.

    The signal handler only sets a flag; at each step end the ranks agree on it (an all-reduce of
    one number, so that every rank saves at the same step even when only some got the signal), and
    then ``control.should_save`` and ``control.should_training_stop`` make the Trainer save (the
    S3 callback uploads) and return. The caller then sees ``preempted`` and exits with
    ``PREEMPTED_EXIT_CODE`` (143), which the operator treats as retryable.

    Must be constructed in the main thread (Python delivers signals there). Under torchrun, raise
    torchrun's ``--shutdown-timeout`` / TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 30 s) to cover a
    save and an upload, or torchrun SIGKILLs the workers first; the pod's
    terminationGracePeriodSeconds must be longer still.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), sync_every_steps: int = 1) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionCallback must be created in the main thread (signal handlers live there)"
            )
        if sync_every_steps < 1:
            raise ValueError(f"sync_every_steps must be >= 1, got {sync_every_steps}")
        self.sync_every_steps = sync_every_steps
        self.received_signal: int | None = None
        self.preempted = False  # True once training was told to save and stop
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # Only async-signal-safe work here: no logging (its lock may be held by the interrupted code).
        self.received_signal = signum
        self._requested.set()
        os.write(2, f"kubetune: received signal {signum}: saving a checkpoint after this step\n".encode())

    @property
    def stop_requested(self) -> bool:
        return self._requested.is_set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.received_signal or signal.SIGTERM)

    def request_stop(self) -> None:
        """What the signal handler does, for callers that learn of a preemption another way."""
        self._requested.set()

    def _agreed(self) -> bool:
        dist = _dist()
        if dist is None:
            return self._requested.is_set()
        import torch

        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if self._requested.is_set() else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step % self.sync_every_steps == 0 and self._agreed():
            if not self.preempted:
                log.warning("preemption: saving checkpoint %d and stopping", state.global_step)
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def window_rate(samples: Sequence[tuple[float, float]]) -> float | None:
    """Rate of change between the first and last (time, count) samples, or None."""
    if len(samples) < 2:
        return None
    (t0, c0), (t1, c1) = samples[0], samples[-1]
    return (c1 - c0) / (t1 - t0) if t1 > t0 else None


class ProgressCallback(TrainerCallback):
    """Feeds a ProgressReporter: step, total steps, epoch, losses, learning rate, tokens/s.

    Tokens are ``state.num_input_tokens_seen`` when ``args.include_num_input_tokens_seen`` is on
    (the Trainer counts them over all ranks); otherwise a forward pre-hook on the model counts the
    training batches' tokens on this rank (attention-mask sum, or all input ids for padding-free
    batches) and multiplies by the world size. Tokens/s is the rate over the last
    ``window_s`` seconds, sampled at most once per ``sample_every_s`` (reading a count kept on
    the GPU synchronises it, so not every step). Only global rank 0 reports.
    """

    def __init__(
        self, reporter: ProgressReporter, *, window_s: float = 30.0, sample_every_s: float = 1.0
    ) -> None:
        self.reporter = reporter
        self.window_s = window_s
        self.sample_every_s = sample_every_s
        self._samples: deque[tuple[float, float]] = deque()
        self._use_trainer_count = False
        self._hook: Any = None
        self._int_tokens = 0
        self._tensor_tokens: Any = None
        self._last_sample = 0.0
        self._tokens_per_second: float | None = None

    # -- token counting ---------------------------------------------------------------------------

    def _count_batch(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            s = mask.sum()  # stays on the device: no sync here
            self._tensor_tokens = s if self._tensor_tokens is None else self._tensor_tokens + s
        elif ids is not None and hasattr(ids, "numel"):
            self._int_tokens += int(ids.numel())

    @property
    def local_tokens_counted(self) -> int:
        """Training tokens the forward hook counted on this rank (0 when the Trainer counts)."""
        return self._int_tokens + (int(self._tensor_tokens.item()) if self._tensor_tokens is not None else 0)

    def _tokens(self, args: Any, state: Any) -> float:
        if self._use_trainer_count:
            return float(state.num_input_tokens_seen)
        return float(self.local_tokens_counted * max(1, int(args.world_size)))

    # -- events -----------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._use_trainer_count = args.include_num_input_tokens_seen not in ("no", False, None)
        if not self._use_trainer_count and model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count_batch, with_kwargs=True)
        self._samples.clear()
        self._last_sample = time.monotonic()
        self._samples.append((self._last_sample, self._tokens(args, state)))
        self.reporter.update(state.global_step, state.max_steps, state.epoch)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        now = time.monotonic()
        if now - self._last_sample >= self.sample_every_s:
            self._last_sample = now
            self._samples.append((now, self._tokens(args, state)))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
                self._samples.popleft()
            self._tokens_per_second = window_rate(self._samples)
        self.reporter.update(
            state.global_step, state.max_steps, state.epoch, tokens_per_second=self._tokens_per_second
        )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.reporter.update(
            state.global_step,
            state.max_steps,
            state.epoch,
            train_loss=logs.get("loss"),
            eval_loss=logs.get("eval_loss"),
            learning_rate=logs.get("learning_rate"),
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if state.is_world_process_zero and self._samples:
            now = time.monotonic()
            if now > self._last_sample:
                self._samples.append((now, self._tokens(args, state)))
                self._tokens_per_second = window_rate(self._samples) or self._tokens_per_second
            self.reporter.update(
                state.global_step,
                state.max_steps,
                state.epoch,
                tokens_per_second=self._tokens_per_second,
                force=True,
            )


def runtime_callbacks(
    config: FinetuningConfig,
    dist: DistInfo,
    store: CheckpointStore | None,
    checkpoints_dir: Path,
    named: dict[str, Any],
) -> list[TrainerCallback]:
    """The callbacks train() installs on every rank; the stateful ones also go into ``named``.

    ``preemption`` (PreemptionCallback), ``reporter`` (the ProgressReporter behind a
    ProgressCallback, global rank 0 only) and ``s3`` (S3CheckpointCallback, with a ``store``).
    Each is put into ``named`` as soon as it exists, so that when a later one fails, the
    caller's close() still restores the signal handlers and stops the reporter.
    """
    callbacks: list[TrainerCallback] = []
    pre = PreemptionCallback()
    named["preemption"] = pre
    callbacks.append(pre)
    if dist.is_global_rank0:
        job = (config.job.namespace, config.job.name) if config.job is not None and _in_pod() else None
        reporter = ProgressReporter(
            job=job,
            metrics_port=config.metrics_port,
            min_patch_interval_s=config.status_patch_interval_s,
            show_bar=config.progress_bar,
        )
        named["reporter"] = reporter
        callbacks.append(ProgressCallback(reporter))
    if store is not None:
        s3cb = S3CheckpointCallback(
            store=store,
            output_dir=str(checkpoints_dir),
            keep_last=config.keep_last,
            node_rank=dist.node_rank,
            is_global_rank0=dist.is_global_rank0,
            num_nodes=dist.num_nodes,
            reporter=named.get("reporter"),
        )
        named["s3"] = s3cb
        callbacks.append(s3cb)
    return callbacks


def _in_pod() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
