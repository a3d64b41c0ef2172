"""The one module that talks to the Kubernetes API (besides kopf's own watches).

Plain dicts in and out, camelCase as the API speaks it: the builders produce
dicts and the status machine consumes them, so there is no model-object
conversion anywhere (it is also several times faster than the generated
client's deserialisation, which matters when 500 requests arrive at once).

Blocking calls on the kubernetes client's connection pool; ``Runtime.call``
(runtime.py) runs them on a thread pool the caller names, so the kopf event
loop never waits on the network.

Create-if-absent is the only way objects are created: a 409 returns the
existing object, which is how a restarted operator adopts what it made
before instead of making a second one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client

from unlearning_contracts.api import API_GROUP_VERSION

from .status import timestamp

COMPONENT = "unlearning-operator"


class ApiError(Exception):
    """A non-2xx answer; ``status`` is the HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def permanent(self) -> bool:
        """The same call will be refused again (invalid, forbidden, over quota): retrying only hides it."""
        return self.status in (400, 403, 422)


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str


def _collection(obj: dict[str, Any]) -> str:
    namespace = obj["metadata"]["namespace"]
    kind = obj["kind"]
    if kind == "Job":
        return f"/apis/batch/v1/namespaces/{namespace}/jobs"
    if kind == "ConfigMap":
        return f"/api/v1/namespaces/{namespace}/configmaps"
    if kind == "NetworkPolicy":
        return f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
    raise ValueError(f"k8s: no path for kind {kind}")


class Kube:
    def __init__(self, api_client: client.ApiClient, request_timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = request_timeout

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        url = path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _method, full_url, header_params, serialized, _post = self.api.param_serialize(
            method=method,
            resource_path=url,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, full_url, header_params=header_params, body=serialized, _request_timeout=self.timeout
        )
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            try:
                status = json.loads(data)
                reason, message = str(status.get("reason", "")), str(status.get("message", ""))
            except (ValueError, AttributeError):
                reason, message = "", data.decode(errors="replace")[:500] if data else ""
            raise ApiError(response.status, reason, message)
        return json.loads(data) if data else {}

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create (for ``metadata.generateName``: the server picks the name); errors raise."""
        return self._request("POST", _collection(obj), body=obj)

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create; on 409 return the existing object. (object, created)."""
        collection = _collection(obj)
        try:
            return self._request("POST", collection, body=obj), True
        except ApiError as error:
            if error.status != 409:
                raise
        existing = self.get(f"{collection}/{quote(obj['metadata']['name'])}")
        if existing is None:
            # Deleted between our create and read (a TTL or a user): create again once.
            return self._request("POST", collection, body=obj), True
        return existing, False

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{quote(name)}")

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch a Job; False when it is gone."""
        path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{quote(name)}"
        try:
            self._request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """Pods carrying the Job's name label, whoever made them (adoption.job_pods tells the Job's own apart)."""
        result = self._request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            query={"labelSelector": f"batch.kubernetes.io/job-name={job_name}"},
        )
        return list(result.get("items") or [])

    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/api/v1/namespaces/{namespace}/configmaps/{quote(name)}")

    def replace_configmap(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT with metadata.resourceVersion: a concurrent writer gets 409, not a lost update."""
        path = f"{_collection(obj)}/{quote(obj['metadata']['name'])}"
        return self._request("PUT", path, body=obj)

    def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status of one of our objects (``plural``: unlearningrequests or
        unlearningcalibrations); the object as it is now, or None when it is gone (deleted meanwhile)."""
        path = f"/apis/{API_GROUP_VERSION}/namespaces/{namespace}/{plural}/{quote(name)}/status"
        try:
            return self._request("PATCH", path, body={"status": patch}, content_type="application/merge-patch+json")
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    # ---- leader election (coordination.k8s.io/v1 Lease) ---------------------------
    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{quote(name)}")

    def create_lease(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Create the Lease; 409 (ApiError) when another replica created it first."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": COMPONENT}},
            "spec": spec,
        }
        return self._request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", body=body)

    def replace_lease(self, lease: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        """PUT with the resourceVersion read: of two replicas racing for the Lease, one gets 409."""
        metadata = lease["metadata"]
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}
        path = f"/apis/coordination.k8s.io/v1/namespaces/{metadata['namespace']}/leases/{quote(metadata['name'])}"
        return self._request("PUT", path, body=body)

    def post_event(self, ref: ObjectRef, type_: str, reason: str, message: str, now: datetime) -> None:
        """A core/v1 Event on one of our objects (what `kubectl describe` shows)."""
        stamp = timestamp(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self._request("POST", f"/api/v1/namespaces/{ref.namespace}/events", body=body)
