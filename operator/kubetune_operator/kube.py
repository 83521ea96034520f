"""A thin, synchronous Kubernetes client for the reconcilers (run in worker threads).

Children are written with server-side apply (field manager `kubetune-operator`): applying the
same desired object twice is a no-op on the server, which is what level-based reconciling needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .conditions import now_iso

log = logging.getLogger(__name__)

FIELD_MANAGER = "kubetune-operator"
T = TypeVar("T")

# (apiVersion, kind) -> (path prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("kubetune.io/v1alpha1", "FineTuneJob"): ("/apis/kubetune.io/v1alpha1", "finetunejobs"),
    ("kubetune.io/v1alpha1", "AdapterDeployment"): ("/apis/kubetune.io/v1alpha1", "adapterdeployments"),
    ("kubetune.io/v1alpha1", "FineTuneSweep"): ("/apis/kubetune.io/v1alpha1", "finetunesweeps"),
}


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    try:
        prefix, plural = _RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"kubetune's client does not know {api_version} {kind}") from None
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def retry_conflicts(fn: Callable[[], T], attempts: int = 5) -> T:
    """Retry on 409 Conflict (optimistic concurrency) and 429/5xx blips, with a short backoff."""
    for i in range(attempts):
        try:
            return fn()
        except ApiException as e:
            retryable = (e.status == 409 and "AlreadyExists" not in (e.body or "")) or e.status in (
                429,
                500,
                503,
                504,
            )
            if not retryable or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)
    raise AssertionError("unreachable")


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*params)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        data = response.data
        if not data:
            return None
        import json

        return json.loads(data)

    # ---- verbs -----------------------------------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` (create or converge), forcing ownership of the fields we set."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return retry_conflicts(
            lambda: self.request(
                "PATCH",
                path,
                obj,
                content_type="application/apply-patch+yaml",
                query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            )
        )

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj`; ApiException 409 AlreadyExists when the name is taken (never overwrites:
        for children whose name must be used once, such as a sweep's trials)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        return retry_conflicts(
            lambda: self.request("POST", path, obj, query=[("fieldManager", FIELD_MANAGER)])
        )

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        out = self.request("GET", object_path(api_version, kind, namespace), query=query) or {}
        return list(out.get("items") or [])

    def merge_patch(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> Any:
        path = object_path(api_version, kind, namespace, name)
        return retry_conflicts(
            lambda: self.request("PATCH", path, patch, content_type="application/merge-patch+json")
        )

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> Any:
        """Merge-patch the status subresource (never the spec)."""
        path = object_path(api_version, kind, namespace, name) + "/status"
        try:
            return retry_conflicts(
                lambda: self.request(
                    "PATCH", path, {"status": status}, content_type="application/merge-patch+json"
                )
            )
        except ApiException as e:
            if e.status == 404:  # deleted meanwhile: nothing to report on
                return None
            raise

    def delete(
        self, api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background"
    ) -> bool:
        try:
            self.request(
                "DELETE",
                object_path(api_version, kind, namespace, name),
                {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def post_event(self, parent: dict[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
        """A Kubernetes Event on the parent (what `kubectl describe` shows). Never raises."""
        meta = parent["metadata"]
        ts = now_iso()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": parent["apiVersion"],
                "kind": parent["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
        }
        try:
            self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except Exception as e:  # an event is best effort: never fail a reconcile over it
            if (
                isinstance(e, ApiException)
                and e.status == 403
                and "NamespaceTerminating" in str(e.body or "")
            ):
                return  # the namespace (and the object) are going away: nobody will read it
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e)
