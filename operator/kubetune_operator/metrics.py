"""The operator's Prometheus metrics (served on /metrics)."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILES = Counter(
    "kubetune_operator_reconciles_total",
    "Reconciles by kind and result (success, error, requeue).",
    ["kind", "result"],
)
RECONCILE_SECONDS = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Time one reconcile took, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("kubetune_operator_queue_depth", "Objects waiting to be reconciled.", ["kind"])


class PhaseTracker(Collector):
    """Objects by phase, as last reconciled (a gauge per phase, computed at scrape time)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts = Tally(self._phases.values())
        family = GaugeMetricFamily(self.name, self.documentation, labels=["phase"])
        for phase, n in sorted(counts.items()):
            family.add_metric([phase], n)
        yield family


FINETUNEJOBS_PHASE = PhaseTracker("kubetune_finetunejobs", "FineTuneJobs by phase, as last reconciled.")
ADAPTERDEPLOYMENTS_PHASE = PhaseTracker(
    "kubetune_adapterdeployments", "AdapterDeployments by phase, as last reconciled."
)
FINETUNESWEEPS_PHASE = PhaseTracker("kubetune_finetunesweeps", "FineTuneSweeps by phase, as last reconciled.")
SWEEP_TRIALS = Counter(
    "kubetune_finetunesweep_trials_total",
    "Sweep trials the operator started (created) and stopped early (pruned).",
    ["event"],
)
REGISTRY.register(FINETUNEJOBS_PHASE)
REGISTRY.register(FINETUNESWEEPS_PHASE)
REGISTRY.register(ADAPTERDEPLOYMENTS_PHASE)

# Phase gauges by parent kind (controller.KindController forgets a deleted object's phase).
PHASES: dict[str, PhaseTracker] = {
    "FineTuneJob": FINETUNEJOBS_PHASE,
    "AdapterDeployment": ADAPTERDEPLOYMENTS_PHASE,
    "FineTuneSweep": FINETUNESWEEPS_PHASE,
}


def forget_phase(kind: str, namespace: str, name: str) -> None:
    tracker = PHASES.get(kind)
    if tracker is not None:
        tracker.forget(namespace, name)
