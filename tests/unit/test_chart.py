"""The Helm chart, rendered and linted by the real `helm` binary (no cluster needed).

The rendered objects are checked against what the operator really reads: the Deployment's
args must parse with the operator's own argument parser, its env vars must be ones
`kubetune_operator.settings` reads, and the PodMonitor must select the pods and ports the
operator's builders create.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator import main as operator_main
from kubetune_operator import settings as operator_settings
from kubetune_operator.adapterdeployment import builders as adep_builders
from kubetune_operator.api import load_adapterdeployment, load_finetunejob
from kubetune_operator.finetunejob import builders as ftj_builders
from tests.testground.cluster import REPO, binaries_dir

CHART = REPO / "charts" / "kubetune"
KUBE_VERSION = "1.36.3"  # a go-installed helm assumes 1.20 otherwise
ALL_ON = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "metrics.grafanaDashboard.enabled=true",
)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    exe = binaries_dir() / "helm"
    assert exe.exists(), f"{exe} is missing: run `make binaries`"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


@functools.cache
def render(*sets: str) -> tuple[dict[str, Any], ...]:
    argv = ["template", "kt", str(CHART), "--namespace", "kubetune-system", "--kube-version", KUBE_VERSION]
    for s in sets:
        argv += ["--set", s]
    res = helm(*argv)
    assert res.returncode == 0, res.stderr
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


# -- lint and schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [(), ALL_ON, ("operator.watchNamespaces={team-a,team-b}", *ALL_ON)],
    ids=["defaults", "all-on", "ns"],
)
def test_helm_lint_strict_passes(sets: tuple[str, ...]) -> None:
    argv = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        argv += ["--set", s]
    res = helm(*argv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("operator.replicas=2",), "at '/operator': additional properties 'replicas' not allowed"),
        (("operator.watchNamespaces={Team_A}",), "at '/operator/watchNamespaces/0'"),
        (("operator.logLevel=trace",), "at '/operator/logLevel'"),
        (("operator.image.pullPolicy=Sometimes",), "at '/operator/image/pullPolicy'"),
        (("metrics.serviceMonitor.interval=30 seconds",), "at '/metrics/serviceMonitor/interval'"),
        (("storage.endpoint=minio:9000",), "at '/storage/endpoint'"),
        (("trainer.terminationGracePeriodSeconds=5",), "at '/trainer/terminationGracePeriodSeconds'"),
        (("metrics.port=8081",), "metrics.port must not be 8081"),
        (("trainer.resources.memory=lots",), "at '/trainer/resources/memory'"),
        (
            ("metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"),
            "metrics.serviceMonitor.enabled needs metrics.service.enabled=true",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_field(sets: tuple[str, ...], message: str) -> None:
    argv = ["template", "kt", str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        argv += ["--set", s]
    res = helm(*argv)
    assert res.returncode != 0, f"{sets} was accepted"
    assert message in res.stderr, res.stderr


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        target = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def test_every_value_is_typed_and_described_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing: list[str] = []

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = _resolve(schema, node)
        if "type" not in node:
            missing.append(f"{path}: no type")
        if not isinstance(value, dict) or not value:
            return
        if node.get("additionalProperties") is not False and "properties" not in node:
            return  # a free-form map (labels, nodeSelector, ...)
        for key, sub in value.items():
            prop = (node.get("properties") or {}).get(key)
            if prop is None:
                missing.append(f"{path}.{key}: not in the schema")
                continue
            if "description" not in _resolve(schema, prop):
                missing.append(f"{path}.{key}: no description")
            walk(sub, prop, f"{path}.{key}")

    walk(values, schema, "values")
    assert not missing, missing


# -- the operator Deployment ---------------------------------------------------------------


def test_operator_deployment_is_one_hardened_replica_with_probes() -> None:
    docs = render()
    dep = one(docs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(docs)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ports == {"metrics": 8080, "health": 8081}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["image"] == "ghcr.io/kubetune/operator:0.1.0"  # appVersion when tag is empty


def test_operator_args_parse_with_the_operators_own_parser() -> None:
    args = operator_main.parse_args(container(render())["args"])
    assert (args.metrics_port, args.health_port, args.namespaces) == (8080, 8081, None)
    ns_args = operator_main.parse_args(
        container(render("operator.watchNamespaces={team-a,team-b}", "operator.logLevel=debug"))["args"]
    )
    assert ns_args.namespaces == ["team-a", "team-b"] and ns_args.verbose


def test_operator_env_is_what_the_settings_read() -> None:
    source = Path(operator_settings.__file__).read_text()
    env = {
        e["name"]: e["value"]
        for e in container(
            render(
                "storage.endpoint=http://minio.minio.svc:9000",
                "storage.secretName=s3-credentials",
                "trainer.resources.cpu=8",
                "trainer.resources.memory=64Gi",
                "trainer.resources.sharedMemorySize=16Gi",
            )
        )["env"]
    }
    kubetune_env = {k for k in env if k.startswith("KUBETUNE_")}
    unknown = {k for k in kubetune_env if f'"{k}"' not in source}
    assert not unknown, f"the chart sets env vars the operator never reads: {unknown}"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert env["KUBETUNE_DEFAULT_S3_ENDPOINT"] == "http://minio.minio.svc:9000"
    assert env["KUBETUNE_DEFAULT_S3_SECRET"] == "s3-credentials"
    assert (
        env["KUBETUNE_TRAINER_DEFAULT_CPU"],
        env["KUBETUNE_TRAINER_DEFAULT_MEMORY"],
        env["KUBETUNE_TRAINER_DEFAULT_SHM"],
    ) == ("8", "64Gi", "16Gi")


# -- RBAC --------------------------------------------------------------------------------------

# The most each resource may be granted. Nothing on Secrets, nothing cluster-level, never a
# write to the spec of a user's AdapterDeployment or FineTuneSweep (only status and delete for the
# TTL). FineTuneJobs also get create and patch: a FineTuneSweep's trials are FineTuneJobs the
# operator creates (and suspends when early stopping prunes them).
ALLOWED = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "delete", "create", "patch"},
    ("kubetune.io", "adapterdeployments"): {"get", "list", "watch", "delete"},
    ("kubetune.io", "finetunesweeps"): {"get", "list", "watch"},
    ("kubetune.io", "finetunejobs/status"): {"get", "patch"},
    ("kubetune.io", "adapterdeployments/status"): {"get", "patch"},
    ("kubetune.io", "finetunesweeps/status"): {"get", "patch"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("kubetune.io", "adapterdeployments/finalizers"): {"update"},
    ("kubetune.io", "finetunesweeps/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "create", "patch", "delete"},
    ("", "services"): {"get", "create", "patch", "delete"},
    ("", "serviceaccounts"): {"get", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create", "patch", "delete"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "create", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def test_cluster_role_is_least_privilege_without_wildcards() -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    text = json.dumps(role["rules"])
    assert "*" not in text, "wildcards in the ClusterRole"
    granted = grants(role["rules"])
    assert not {res for _, res in granted} & {"secrets", "nodes", "namespaces", "clusterroles"}
    assert not set().union(*granted.values()) & {"escalate", "bind", "impersonate", "deletecollection"}
    too_much = {k: v - ALLOWED.get(k, set()) for k, v in granted.items() if v - ALLOWED.get(k, set())}
    assert not too_much, f"more than the operator needs: {too_much}"
    # And everything the operator needs is there (the integration test runs it with exactly these).
    assert granted == ALLOWED
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kt-kubetune",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune-system"}
    ]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_watch_namespaces_gives_a_role_per_namespace_and_no_cluster_permissions() -> None:
    docs = render("operator.watchNamespaces={team-a,team-b}", *ALL_ON)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    cluster_rules = one(render(), "ClusterRole")["rules"]
    for ns in ("team-a", "team-b"):
        assert roles[ns]["rules"] == cluster_rules
        assert bindings[ns]["roleRef"]["kind"] == "Role"
        assert bindings[ns]["subjects"][0]["namespace"] == "kubetune-system"
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


# -- monitoring --------------------------------------------------------------------------------


def test_servicemonitor_scrapes_the_metrics_service() -> None:
    docs = render(*ALL_ON)
    svc, sm = one(docs, "Service"), one(docs, "ServiceMonitor")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert not [d for d in render() if d["kind"] in ("ServiceMonitor", "PodMonitor", "ConfigMap")]


def _pod_templates() -> list[dict[str, Any]]:
    examples = REPO / "examples"
    ftj = load_finetunejob(yaml.safe_load((examples / "lora-single-gpu.yaml").read_text())).to_manifest()
    ftj["metadata"].update(namespace="team-a", uid="u-1", generation=1)
    adep = load_adapterdeployment(
        yaml.safe_load((examples / "adapterdeployment-builtin.yaml").read_text())
    ).to_manifest()
    adep["metadata"].update(namespace="team-a", uid="u-2", generation=1)
    settings = operator_settings.Settings()
    job = ftj_builders.job(ftj, 1, settings)
    adapters = [adep_builders.ResolvedAdapter("sql", "s3://kubetune/adapters/sql-v1/", None)]
    dep = adep_builders.deployment(adep, adapters, settings)
    return [job["spec"]["template"], dep["spec"]["template"]]


def test_podmonitor_selects_the_trainer_and_server_pods_the_operator_creates() -> None:
    pm = one(render(*ALL_ON), "PodMonitor")["spec"]
    selector = pm["selector"]["matchLabels"]
    scraped_ports = {e["port"] for e in pm["podMetricsEndpoints"]}
    trainer, server = _pod_templates()
    for template, port in ((trainer, "metrics"), (server, "http")):
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert port in ports and port in scraped_ports
    # The dashboard groups by these target labels; both pod kinds carry their parent's.
    assert set(pm["podTargetLabels"]) >= {"kubetune.io/finetunejob", "kubetune.io/adapterdeployment"}
    assert "kubetune.io/finetunejob" in trainer["metadata"]["labels"]
    assert "kubetune.io/adapterdeployment" in server["metadata"]["labels"]


def test_podmonitor_scrapes_trainer_metrics_only_on_node_rank_0() -> None:
    """Only global rank 0 serves the trainer's metrics; the node rank the builder hands torchrun
    comes from the annotation the PodMonitor keeps on."""
    pm = one(render(*ALL_ON), "PodMonitor")["spec"]
    [metrics] = [e for e in pm["podMetricsEndpoints"] if e["port"] == "metrics"]
    [keep] = metrics["relabelings"]
    [trainer] = _pod_templates()[0]["spec"]["containers"]
    [node_rank] = [e for e in trainer["env"] if e["name"] == "NODE_RANK"]
    annotation = re.fullmatch(
        r"metadata\.annotations\['(.+)'\]", node_rank["valueFrom"]["fieldRef"]["fieldPath"]
    ).group(1)
    prometheus_name = "__meta_kubernetes_pod_annotation_" + re.sub(r"[^A-Za-z0-9_]", "_", annotation)
    assert keep == {"sourceLabels": [prometheus_name], "regex": "0", "action": "keep"}


def test_grafana_dashboard_configmap_carries_the_dashboard_file() -> None:
    cm = one(render(*ALL_ON, "metrics.grafanaDashboard.namespace=monitoring"), "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "kubetune.json").read_text())
    assert json.loads(cm["data"]["kubetune.json"]) == shipped
