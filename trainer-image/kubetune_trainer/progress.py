"""Training progress: a progress bar locally, the FineTuneJob's status in a pod, Prometheus metrics.

``ProgressReporter`` is used by global rank 0 only. In a pod (``job=(namespace, name)``) it
merge-patches the ``status`` subresource of the FineTuneJob with ``status.progress`` and
``status.checkpoint``, at most once per ``min_patch_interval_s`` (checkpoint events and the final
update on ``close()`` go out at once). Patches are sent from a background thread so a slow API
server never stalls training, and a failed patch is logged and retried with the next one; it never
raises into training. The Kubernetes client is imported lazily (only when a job is given).

Metric names are documented in docs/metrics-trainer.md.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
MERGE_PATCH = "application/merge-patch+json"
UPLOAD_SECONDS_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


# -- pure helpers --------------------------------------------------------------------------------


def finite(value: float | None) -> float | None:
    """``value`` as a float, or None for None / NaN / inf (JSON cannot carry those)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def significant(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded to ``digits`` significant digits (None for None / NaN / inf)."""
    value = finite(value)
    return float(f"{value:.{digits}g}") if value is not None else None


def progress_percent(step: int, total_steps: int | None) -> float | None:
    if not total_steps or total_steps <= 0:
        return None
    return round(min(100.0, 100.0 * step / total_steps), 2)


def estimate_eta_seconds(
    step: int, total_steps: int | None, first_step: int, elapsed_s: float
) -> float | None:
    """Remaining time at the average pace since ``first_step`` (the step this process started
    from: resumed steps took no time here)."""
    done = step - first_step
    if not total_steps or done <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, (total_steps - step) * elapsed_s / done)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class ProgressState:
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    updated_at: float | None = None  # unix time


@dataclass
class CheckpointState:
    latest: str
    step: int
    count: int


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def build_status_patch(progress: ProgressState | None, checkpoint: CheckpointState | None) -> dict[str, Any]:
    """The JSON merge patch for the FineTuneJob status subresource.

    Unknown values are left out rather than sent as null: in a merge patch null deletes the
    field, and e.g. the last eval loss should stay visible between evaluations.
    """
    status: dict[str, Any] = {}
    if progress is not None:
        eta = finite(progress.eta_seconds)
        tps = finite(progress.tokens_per_second)
        epoch = finite(progress.epoch)
        status["progress"] = _drop_none(
            {
                "step": int(progress.step),
                "totalSteps": int(progress.total_steps) if progress.total_steps else None,
                "epoch": round(epoch, 4) if epoch is not None else None,
                "percent": progress_percent(progress.step, progress.total_steps),
                # Four significant digits: the LOSS column shows 0.7286, not 0.7285616397857666.
                "trainLoss": significant(progress.train_loss),
                "evalLoss": significant(progress.eval_loss),
                "learningRate": finite(progress.learning_rate),
                "tokensPerSecond": round(tps, 1) if tps is not None else None,
                "etaSeconds": round(eta) if eta is not None else None,
                "updatedAt": rfc3339(progress.updated_at) if progress.updated_at else None,
            }
        )
    if checkpoint is not None:
        status["checkpoint"] = {
            "latest": checkpoint.latest,
            "step": checkpoint.step,
            "count": checkpoint.count,
        }
    return {"status": status}


def merge_patches(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """Combine two merge patches: ``newer`` wins field by field (nested objects merged)."""
    out = copy.deepcopy(older)
    for key, value in newer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patches(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class RateLimiter:
    """At most one send per ``min_interval_s``; ``force`` bypasses it."""

    def __init__(self, min_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_patch_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.last_sent: float | None = None

    def wait_time(self) -> float:
        """Seconds until a send is allowed (0 when it is allowed now)."""
        if self.last_sent is None:
            return 0.0
        return max(0.0, self.last_sent + self.min_interval_s - self.clock())

    def due(self, force: bool = False) -> bool:
        return force or self.wait_time() == 0.0

    def mark_sent(self) -> None:
        self.last_sent = self.clock()


# -- Kubernetes status patches --------------------------------------------------------------------


class StatusPatcher:
    """Sends merge patches to ``finetunejobs/<name>/status`` from a background thread."""

    def __init__(
        self,
        namespace: str,
        name: str,
        min_interval_s: float,
        api_client: Any = None,
        resource: tuple[str, str, str] = (GROUP, VERSION, PLURAL),
    ) -> None:
        self.namespace, self.name = namespace, name
        self.group, self.version, self.plural = resource
        self.limiter = RateLimiter(min_interval_s)
        self._api_client = api_client
        self._api: Any = None
        self._disabled = False
        self._pending: dict[str, Any] | None = None
        self._force = False
        self._closing = False
        self._cond = threading.Condition()
        self._last_error: str | None = None
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="kubetune-status-patcher", daemon=True)
        self._thread.start()

    def submit(self, patch: dict[str, Any], force: bool = False) -> None:
        with self._cond:
            self._pending = merge_patches(self._pending or {}, patch)
            self._force = self._force or force
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and (self._pending is None or not self.limiter.due(self._force)):
                    self._cond.wait(timeout=self.limiter.wait_time() if self._pending is not None else None)
                if self._closing:
                    return
                patch, self._pending, self._force = self._pending, None, False
            assert patch is not None
            if not self.send(patch):
                with self._cond:  # keep it for the next attempt, under anything newer
                    self._pending = merge_patches(patch, self._pending or {})

    def close(self, final_patch: dict[str, Any] | None, timeout_s: float = 15.0) -> None:
        """Stop the thread, then send everything pending plus ``final_patch`` synchronously."""
        with self._cond:
            self._closing = True
            pending, self._pending = self._pending, None
            self._cond.notify()
        self._thread.join(timeout=timeout_s)
        patch = merge_patches(pending or {}, final_patch or {})
        if patch.get("status"):
            self.send(patch)

    def _client(self) -> Any:
        if self._api is None:
            # Imported here: the trainer must not need the Kubernetes client outside a cluster.
            from kubernetes import client, config

            api_client = self._api_client
            if api_client is None:
                cfg = client.Configuration()
                try:
                    config.load_incluster_config(client_configuration=cfg)
                except config.ConfigException:
                    # Read KUBECONFIG now: the client reads it once, at its own import.
                    config.load_kube_config(
                        config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg
                    )
                api_client = client.ApiClient(cfg)
            self._api = client.CustomObjectsApi(api_client)
        return self._api

    def send(self, patch: dict[str, Any]) -> bool:
        """One patch; failures are logged (without credentials) and reported as False."""
        if self._disabled:
            return False
        try:
            api = self._client()
        except Exception as e:
            self._disabled = True
            log.warning(
                "FineTuneJob status updates disabled: no Kubernetes configuration (in-cluster or "
                "KUBECONFIG) could be loaded: %s",
                # The client's own config messages name files and keys; other errors only by type.
                f"{type(e).__name__}: {str(e)[:200]}"
                if type(e).__name__ == "ConfigException"
                else type(e).__name__,
            )
            return False
        try:
            api.patch_namespaced_custom_object_status(
                self.group,
                self.version,
                self.namespace,
                self.plural,
                self.name,
                patch,
                _content_type=MERGE_PATCH,
                _request_timeout=10,
            )
        except Exception as e:
            self.failed += 1
            self._log_failure(e)
            return False
        finally:
            self.limiter.mark_sent()
        self.sent += 1
        if self._last_error is not None:
            log.info("FineTuneJob status updates work again")
            self._last_error = None
        return True

    def _log_failure(self, e: Exception) -> None:
        status = getattr(e, "status", None)
        if status is not None:  # kubernetes ApiException: status, reason and the server's message only
            body = str(getattr(e, "body", "") or "")[:300]
            what = f"HTTP {status} {getattr(e, 'reason', '')}: {body}".strip()
        else:
            what = f"{type(e).__name__}: {e}"[:300]
        # Log each distinct error once, not once per patch.
        if what != self._last_error:
            hint = (
                f" (the pod's ServiceAccount needs the 'patch' verb on {self.plural}/status)"
                if status == 403
                else ""
            )
            log.warning(
                "status patch of %s/%s in namespace %s failed: %s%s",
                self.plural,
                self.name,
                self.namespace,
                what,
                hint,
            )
            self._last_error = what


# -- Prometheus -------------------------------------------------------------------------------------


class TrainerMetrics:
    """The trainer's metrics on their own registry (several reporters may live in one process)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"kubetune_trainer_{name}", doc, registry=self.registry)

        self.step = gauge("step", "Optimizer steps completed.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned for the whole run.")
        self.epoch = gauge("epoch", "Fractional epoch reached.")
        self.train_loss = gauge("train_loss", "Last logged training loss.")
        self.eval_loss = gauge("eval_loss", "Last evaluation loss.")
        self.learning_rate = gauge("learning_rate", "Current learning rate.")
        self.tokens_per_second = gauge("tokens_per_second", "Training throughput in input tokens per second.")
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds until training ends.")
        self.checkpoints_uploaded = Counter(
            "kubetune_trainer_checkpoints_uploaded",
            "Checkpoints uploaded to S3 and completed.",
            registry=self.registry,
        )
        self.checkpoint_upload_seconds = Histogram(
            "kubetune_trainer_checkpoint_upload_seconds",
            "Seconds to upload a checkpoint and write its manifest.",
            buckets=UPLOAD_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe(self, state: ProgressState) -> None:
        self.step.set(state.step)
        pairs = [
            (self.total_steps, state.total_steps),
            (self.epoch, state.epoch),
            (self.train_loss, state.train_loss),
            (self.eval_loss, state.eval_loss),
            (self.learning_rate, state.learning_rate),
            (self.tokens_per_second, state.tokens_per_second),
            (self.eta_seconds, state.eta_seconds),
        ]
        for metric, value in pairs:
            if value is not None:
                metric.set(float(value))


# -- the reporter -----------------------------------------------------------------------------------


class ProgressReporter:
    """Reports training progress to a progress bar, the FineTuneJob status and Prometheus.

    ``metrics_port=0`` binds a free port (see ``.metrics_port`` after construction).
    ``api_client`` (a ``kubernetes.client.ApiClient``) overrides in-cluster/KUBECONFIG loading;
    ``resource`` is the (group, version, plural) patched, FineTuneJobs by default.
    """

    def __init__(
        self,
        job: tuple[str, str] | None = None,
        metrics_port: int | None = None,
        min_patch_interval_s: float = 10.0,
        show_bar: bool = True,
        *,
        metrics_addr: str = "0.0.0.0",
        registry: Any = None,
        api_client: Any = None,
        resource: tuple[str, str, str] = (GROUP, VERSION, PLURAL),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if job is not None and (len(job) != 2 or not all(isinstance(p, str) and p for p in job)):
            raise ValueError(f"job must be (namespace, name) of the FineTuneJob, got {job!r}")
        self.job = job
        self.show_bar = show_bar
        self.state = ProgressState()
        self.checkpoint_state: CheckpointState | None = None
        self._clock = clock
        self._first: tuple[int, float] | None = None  # (step, clock) of the first update
        self._bar: Any = None
        self._closed = False
        self._lock = threading.Lock()
        self.patcher = (
            StatusPatcher(job[0], job[1], min_patch_interval_s, api_client, resource) if job else None
        )
        self.metrics: TrainerMetrics | None = None
        self._server: Any = None
        self.metrics_port: int | None = None
        if metrics_port is not None:
            from prometheus_client import start_http_server

            self.metrics = TrainerMetrics(registry)
            try:
                self._server, _ = start_http_server(
                    metrics_port, addr=metrics_addr, registry=self.metrics.registry
                )
                self.metrics_port = int(self._server.server_address[1])
            except OSError as e:  # metrics are for watching the run: never worth losing it over
                log.warning(
                    "metrics endpoint not started on port %s (%s): training goes on without /metrics; "
                    "set metrics_port (KUBETUNE_METRICS_PORT) to a free port to get it",
                    metrics_port,
                    e,
                )

    def update(
        self,
        step: int,
        total_steps: int | None,
        epoch: float | None,
        train_loss: float | None = None,
        eval_loss: float | None = None,
        learning_rate: float | None = None,
        tokens_per_second: float | None = None,
        *,
        force: bool = False,
    ) -> None:
        """Record the latest values (None keeps the previous one) and report them."""
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            if self._first is None or step < self._first[0]:
                self._first = (step, now)
            s = self.state
            s.step, s.total_steps = int(step), total_steps or s.total_steps
            s.epoch = finite(epoch) if epoch is not None else s.epoch
            s.train_loss = finite(train_loss) if train_loss is not None else s.train_loss
            s.eval_loss = finite(eval_loss) if eval_loss is not None else s.eval_loss
            s.learning_rate = finite(learning_rate) if learning_rate is not None else s.learning_rate
            s.tokens_per_second = (
                finite(tokens_per_second) if tokens_per_second is not None else s.tokens_per_second
            )
            s.eta_seconds = estimate_eta_seconds(s.step, s.total_steps, self._first[0], now - self._first[1])
            s.updated_at = time.time()
            self._report(force)

    def checkpoint(self, uri: str, step: int, count: int, upload_seconds: float | None = None) -> None:
        """A checkpoint was completed in S3: ``count`` complete checkpoints are kept there."""
        with self._lock:
            if self._closed:
                return
            self.checkpoint_state = CheckpointState(latest=uri, step=int(step), count=int(count))
            if self.metrics:
                self.metrics.checkpoints_uploaded.inc()
                if upload_seconds is not None:
                    self.metrics.checkpoint_upload_seconds.observe(upload_seconds)
            if self.patcher:
                self.patcher.submit(build_status_patch(None, self.checkpoint_state), force=True)

    def _report(self, force: bool) -> None:
        if self.metrics:
            self.metrics.observe(self.state)
        if self.show_bar:
            self._update_bar()
        if self.patcher:
            self.patcher.submit(build_status_patch(self.state, None), force=force)

    def _update_bar(self) -> None:
        s = self.state
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=s.total_steps, initial=s.step, unit="step", desc="training", dynamic_ncols=True
            )
        if s.total_steps and self._bar.total != s.total_steps:
            self._bar.total = s.total_steps
        postfix = {}
        if s.train_loss is not None:
            postfix["loss"] = f"{s.train_loss:.4f}"
        if s.eval_loss is not None:
            postfix["eval_loss"] = f"{s.eval_loss:.4f}"
        if s.learning_rate is not None:
            postfix["lr"] = f"{s.learning_rate:.2e}"
        if s.tokens_per_second is not None:
            postfix["tok/s"] = f"{s.tokens_per_second:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, s.step - self._bar.n))

    def close(self) -> None:
        """Send the final state (always, ignoring the rate limit), close the bar and the server."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.patcher:
            self.patcher.close(build_status_patch(self.state if self._first else None, self.checkpoint_state))
        if self._bar is not None:
            self._bar.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
