"""The engine: one worker thread that owns the model, schedules rows and runs them.

Nothing else touches the model once serving starts: HTTP handlers put rows (and commands such
as "load this adapter") on a queue and wait on asyncio queues/futures, so the event loop never
blocks on torch, and loading an adapter never races a step.

Scheduling ``mixed`` (the default) is continuous batching (:mod:`.continuous`): between two
decoding steps the worker admits queued rows while the running batch has fewer than
``max_batch_size`` sequences (they are prefilled together and join it), runs queued commands,
then generates one token for every running row in one forward pass, whatever adapters they use.
A row leaves as soon as it ends, and its slot goes to the next queued row. Rows that arrive
while others run never wait for a window; only a burst that reaches an idle engine is collected
(``batch_window_ms`` / ``batch_max_wait_ms``, as a static batch is) so that it is prefilled as one
group instead of one forward pass per request.

The other schedulings are the static baselines the benchmark compares against: the worker
collects a batch (until ``max_batch_size``, until no new row arrived for ``batch_window_ms``, or
until the first row waited ``batch_max_wait_ms``) and runs it to the end of its longest row,
as one ``generate()`` call (``static``), one per adapter (``per_adapter``) or one per request
(``sequential``).

Isolation: a row whose adapter was unloaded meanwhile fails alone (before it starts, or between
two steps). If the forward pass raises for rows that are joining, each is retried alone, so only
the row that causes the error fails; a failing step fails the rows running in it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import BASE_ROW, Scheduling
from .metrics import ServerMetrics
from .rows import Failed, ModelNotLoadedError, Row

if TYPE_CHECKING:
    from .continuous import RunningBatch
    from .model import LoadedModel

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Command:
    fn: Callable[[], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class Engine:
    def __init__(
        self,
        *,
        max_batch_size: int = 16,
        batch_window_ms: float = 10.0,
        batch_max_wait_ms: float = 100.0,
        scheduling: Scheduling = "mixed",
        metrics: ServerMetrics | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.window_s = batch_window_ms / 1000.0
        self.max_wait_s = max(batch_max_wait_ms, batch_window_ms) / 1000.0
        self.scheduling = scheduling
        self.metrics = metrics or ServerMetrics()
        self.lm: LoadedModel | None = None
        self.base_name = BASE_ROW  # label used for base-model rows in metrics
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        # Whoever touches the model holds this: the worker, or a caller running a command inline
        # before the worker starts (several loader threads may do that at once).
        self._model_lock = threading.Lock()
        self.batches_run = 0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kubetune-engine", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------ client side (any thread)

    def submit(self, row: Row) -> None:
        self._queue.put(row)
        self.metrics.queue_depth.inc()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread between batches (directly when the worker is not running)."""
        cmd = _Command(fn)
        if not self.running:
            self._run_command(cmd)
        else:
            self._queue.put(cmd)
            self.metrics.queue_depth.inc()
        return cmd.future

    def label(self, model: str) -> str:
        return self.base_name if model == BASE_ROW else model

    # ------------------------------------------------------------------ worker thread

    def _take(self, **kwargs: Any) -> Any:
        item = self._queue.get(**kwargs)
        if item is not _STOP:
            self.metrics.queue_depth.dec()
        return item

    def _loop(self) -> None:
        if self.scheduling == "mixed":
            self._loop_continuous()
        else:
            self._loop_static()

    # ------------------------------------------------------------------ continuous batching

    def _loop_continuous(self) -> None:
        # torch: imported by the worker, not at import time
        from .continuous import RunningBatch, UnsupportedModelError

        waiting: collections.deque[Any] = collections.deque()
        batch: RunningBatch | None = None
        refusal: Exception | None = None
        while True:
            if not waiting and (batch is None or not len(batch)):
                # Idle: block for the next item; a burst that starts now is prefilled as one group.
                waiting.append(self._queue.get())
                if isinstance(waiting[0], Row):
                    waiting.extend(self._gather(waiting[0], self.max_batch_size - 1))
            try:  # whatever else arrived joins the queue of waiting items
                while True:
                    waiting.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            with self._model_lock:
                if batch is None or batch.lm is not self.lm:
                    if batch is not None:  # the base model was replaced under the batch
                        self._fail_running(batch, RuntimeError("the model was reloaded"))
                        batch.release()
                    batch, refusal = None, None
                    try:
                        batch = RunningBatch(self.lm) if self.lm is not None else None
                    except UnsupportedModelError as exc:
                        refusal = exc  # every row fails with the reason and the fix
                try:
                    if self._admit(waiting, batch, refusal):
                        return
                    if batch is not None and len(batch):
                        self._step(batch)
                except BaseException:  # never let one step kill the worker
                    log.exception("a generation step failed unexpectedly")
                    if batch is not None:
                        self._fail_running(batch, RuntimeError("internal error while generating"))

    def _admit(
        self, waiting: collections.deque[Any], batch: RunningBatch | None, refusal: Exception | None
    ) -> bool:
        """Start queued rows while slots are free and run queued commands, in arrival order.

        Returns True when the engine was told to stop."""
        if any(item is _STOP for item in waiting):  # shutting down: nothing new starts, nothing waits
            shutdown = RuntimeError("the server is shutting down")
            for item in waiting:
                if isinstance(item, Row):
                    self._fail(item, shutdown)
                elif isinstance(item, _Command) and item.future.set_running_or_notify_cancel():
                    item.future.set_exception(shutdown)
            if batch is not None:
                self._fail_running(batch, shutdown)
                batch.release()
            return True
        joining: list[Row] = []
        while waiting:
            item = waiting[0]
            if isinstance(item, Row):
                if batch is not None and len(batch) + len(joining) >= self.max_batch_size:
                    break
                waiting.popleft()
                self.metrics.queue_depth.dec()
                if item.cancelled:
                    continue
                if refusal is not None:
                    self._fail(item, refusal)
                    continue
                if batch is None or not batch.lm.has(item.model):
                    self._fail(
                        item, ModelNotLoadedError(f"model '{self.label(item.model)}' is not loaded any more")
                    )
                    continue
                self.metrics.queue_wait.observe(time.monotonic() - item.enqueued_at)
                joining.append(item)
                continue
            if joining:  # rows that came before the command start first
                break
            waiting.popleft()
            self.metrics.queue_depth.dec()
            if batch is not None:
                batch.release()  # commands may change the adapters the step's hooks refer to
            self._run_command(item, locked=True)
            if (batch.lm if batch is not None else None) is not self.lm:
                return False  # the base model was (re)loaded: the loop makes a new batch first
            if batch is not None:
                # An adapter may be gone now: its running rows end here, the others go on.
                for row in batch.drop(lambda r: not batch.lm.has(r.model)):
                    self._fail(row, ModelNotLoadedError(f"model '{self.label(row.model)}' was unloaded"))
        if joining and batch is not None:
            self._join(batch, joining)
        return False

    def _join(self, batch: RunningBatch, rows: list[Row]) -> None:
        self.batches_run += 1
        self.metrics.observe_batch(self.label(r.model) for r in rows)
        try:
            batch.prefill(rows)
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows[0], exc)
                return
            log.warning("prefilling %d rows failed (%s): retrying them one by one", len(rows), exc)
            for row in rows:
                try:
                    batch.prefill([row])
                except Exception as row_exc:
                    self._fail(row, row_exc)

    def _step(self, batch: RunningBatch) -> None:
        self.metrics.step_batch_size.observe(len(batch))
        try:
            batch.step()
        except Exception as exc:
            self._fail_running(batch, exc)

    def _fail_running(self, batch: RunningBatch, exc: BaseException) -> None:
        for row in batch.drop(lambda r: True):
            self._fail(row, exc)

    # ------------------------------------------------------------------ static batches (baselines)

    def _gather(self, first: Row, limit: int) -> list[Any]:
        """Items that arrive within the batch window after ``first``: at most ``limit`` rows,
        ending early at a command or stop (which is returned last)."""
        got: list[Any] = []
        cap = first.enqueued_at + self.max_wait_s
        last_arrival = first.enqueued_at
        while len(got) < limit:
            wait = min(cap, last_arrival + self.window_s) - time.monotonic()
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            got.append(item)
            if not isinstance(item, Row):
                break
            last_arrival = max(last_arrival, item.enqueued_at)
        return got

    def _loop_static(self) -> None:
        while True:
            item = self._take()
            if item is _STOP:
                return
            if isinstance(item, _Command):
                self._run_command(item)
                continue
            batch: list[Row] = [item]
            after: Any = None
            for nxt in self._gather(item, self.max_batch_size - 1):
                if nxt is not _STOP:
                    self.metrics.queue_depth.dec()
                if isinstance(nxt, Row):
                    batch.append(nxt)
                else:  # a command or stop: run the batch first, then it
                    after = nxt
            try:
                with self._model_lock:
                    self._run_batch(batch)
            except BaseException:  # never let one batch kill the worker
                log.exception("batch failed unexpectedly")
                for row in batch:
                    row.send(Failed(RuntimeError("internal error while generating")))
            if after is _STOP:
                return
            if after is not None:
                self._run_command(after)

    def _run_command(self, cmd: _Command, *, locked: bool = False) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return
        try:
            if locked:
                result = cmd.fn()
            else:
                with self._model_lock:
                    result = cmd.fn()
        except BaseException as exc:
            cmd.future.set_exception(exc)
        else:
            cmd.future.set_result(result)

    def _run_batch(self, rows: list[Row]) -> None:
        now = time.monotonic()
        live: list[Row] = []
        for row in rows:
            if row.cancelled:
                continue
            if self.lm is None or not self.lm.has(row.model):
                self._fail(
                    row, ModelNotLoadedError(f"model '{self.label(row.model)}' is not loaded any more")
                )
                continue
            self.metrics.queue_wait.observe(now - row.enqueued_at)
            live.append(row)
        if not live:
            return
        self.batches_run += 1
        try:
            self._generate(live)
        except Exception as exc:
            if len(live) == 1:
                self._fail(live[0], exc)
                return
            log.warning("a batch of %d failed (%s): retrying its rows one by one", len(live), exc)
            for row in live:
                if row.emitted:  # text already went out: a retry would repeat it
                    self._fail(row, exc)
                    continue
                try:
                    self._generate([row])
                except Exception as row_exc:
                    self._fail(row, row_exc)

    def _fail(self, row: Row, exc: BaseException) -> None:
        if row.done:
            return
        if not isinstance(exc, ModelNotLoadedError):
            log.error("request for model %s failed: %s", self.label(row.model), exc, exc_info=exc)
        self.metrics.row_failures.labels(self.label(row.model)).inc()
        row.send(Failed(exc))

    def _generate(self, rows: list[Row]) -> None:
        from .decoding import generate_rows  # torch: imported by the worker, not at import time

        lm = self.lm
        assert lm is not None
        common: dict[str, Any] = {"device": lm.device, "eos_ids": lm.eos_ids, "pad_id": lm.pad_id}
        if self.scheduling == "static":
            names = [r.model for r in rows] if lm.is_peft else None
            self.metrics.observe_batch(self.label(r.model) for r in rows)
            generate_rows(lm.model, lm.tokenizer, rows, adapter_names=names, **common)
            return
        groups: list[list[Row]]
        if self.scheduling == "per_adapter":
            by_model: dict[str, list[Row]] = {}
            for r in rows:
                by_model.setdefault(r.model, []).append(r)
            groups = list(by_model.values())
        else:  # sequential: one request at a time, switching the active adapter each time
            groups = [[r] for r in rows]
        for group in groups:
            self.metrics.observe_batch(self.label(r.model) for r in group)
            with lm.activated(group[0].model):
                generate_rows(lm.model, lm.tokenizer, group, **common)
