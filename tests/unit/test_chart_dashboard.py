"""The Grafana dashboard (charts/kubetune/dashboards/kubetune.json) queries only metrics that exist.

Every PromQL expression in the dashboard (panel targets and variable queries) is parsed for
metric names, and each must be exposed by one of the code's registries: the operator's
(kubetune_operator.metrics), the trainer's (kubetune_trainer.progress.TrainerMetrics) or the
built-in server's (kubetune_trainer.serve.metrics.ServerMetrics). Renaming a metric in the
code without updating the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

import kubetune_operator.metrics  # noqa: F401  (registers the operator's metrics on REGISTRY)
from kubetune_trainer.progress import TrainerMetrics
from kubetune_trainer.serve.metrics import ServerMetrics
from tests.unit.test_chart import ALL_ON, CHART, one, render

DASHBOARD = CHART / "dashboards" / "kubetune.json"

# Suffixes under which prometheus_client exposes each metric type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
}
KEYWORDS |= {"inf", "nan", "Inf", "NaN"}


def exposed_names(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def known_metrics() -> dict[str, set[str]]:
    return {
        "operator": {n for n in exposed_names(REGISTRY) if n.startswith("kubetune_")},
        "trainer": exposed_names(TrainerMetrics().registry),
        "server": exposed_names(ServerMetrics().registry),
    }


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (selectors, not functions, keywords or labels)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers (and Grafana $variables inside them)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        if word in KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and groupings."""
    out = set()
    for block in re.findall(r"\{([^}]*)\}", expr):
        out |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    for block in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        out |= {x.strip() for x in block.split(",") if x.strip()}
    return out


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        assert m, f"variable {var['name']}: expected label_values(<query>, <label>), got {q!r}"
        yield f"variable {var['name']}", m.group(1)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (phase) (kubetune_finetunejobs{namespace=~"$ns"})', {"kubetune_finetunejobs"}),
        (
            'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x="1"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        ("100 * a / (b > 0) or on (x) c offset 5m", {"a", "b", "c"}),
        ('{__name__=~"kubetune_.*"}', set()),
        ("1e3 * rate(x_total[5m])", {"x_total"}),
    ],
)
def test_the_promql_parser_finds_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_metric_the_dashboard_queries_exists_in_the_code() -> None:
    known = set().union(*known_metrics().values())
    unknown: list[str] = []
    for where, expr in queries(dashboard()):
        for name in metric_names(expr):
            if name not in known:
                unknown.append(f"{where}: {name}")
    assert not unknown, "metrics the code does not expose:\n" + "\n".join(unknown)


def test_every_panel_target_queries_a_kubetune_metric() -> None:
    for where, expr in queries(dashboard()):
        if where.startswith("panel"):
            assert any(n.startswith("kubetune_") for n in metric_names(expr)), f"{where}: {expr}"


def test_dashboard_covers_jobs_training_and_serving() -> None:
    used = set().union(*(metric_names(e) for _, e in queries(dashboard())))
    for required in (
        "kubetune_finetunejobs",  # jobs by phase
        "kubetune_trainer_step",  # progress
        "kubetune_trainer_total_steps",
        "kubetune_trainer_train_loss",
        "kubetune_trainer_tokens_per_second",
        "kubetune_trainer_eta_seconds",
        "kubetune_serve_requests_total",  # request rate per adapter
        "kubetune_serve_request_duration_seconds_bucket",  # latency per adapter
    ):
        assert required in used, f"the dashboard does not show {required}"


def test_dashboard_labels_are_ones_prometheus_attaches() -> None:
    """kubetune_io_* labels come from the chart's PodMonitor podTargetLabels; the rest from
    the metrics themselves or Prometheus' own target labels."""
    pm = one(render(*ALL_ON), "PodMonitor")["spec"]
    target_labels = {re.sub(r"[^A-Za-z0-9_]", "_", label) for label in pm["podTargetLabels"]}
    metric_labels = {"phase", "kind", "result", "model", "endpoint", "status", "le", "event"}
    prometheus_labels = {"namespace", "pod", "job", "instance", "__name__"}
    for where, expr in queries(dashboard()):
        stray = label_names(expr) - target_labels - metric_labels - prometheus_labels
        assert not stray, f"{where}: labels nothing attaches: {stray}"


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "kubetune" and dash["title"] == "kubetune"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


OBSERVABILITY_DOC = CHART.parent.parent / "docs" / "observability.md"


def documented_metrics() -> set[str]:
    """Names in the first column of docs/observability.md's metric tables."""
    return set(re.findall(r"^\| `(kubetune_\w+)` \|", OBSERVABILITY_DOC.read_text(), re.MULTILINE))


def test_the_documented_metrics_are_exactly_the_ones_the_code_exposes() -> None:
    documented = documented_metrics()
    assert documented, f"no metric tables found in {OBSERVABILITY_DOC}"
    # A counter is documented with its _total suffix, every other type by its family name.
    code = {
        f.name + "_total" if f.type == "counter" else f.name
        for registry in (REGISTRY, TrainerMetrics().registry, ServerMetrics().registry)
        for f in registry.collect()
        if f.name.startswith("kubetune_")
    }
    assert not documented - code, f"documented but not exposed: {sorted(documented - code)}"
    assert not code - documented, (
        f"exposed but missing from {OBSERVABILITY_DOC.name}: {sorted(code - documented)}"
    )
