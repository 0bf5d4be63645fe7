"""A stand-in for kube-apiserver on loopback: the few endpoints the coordinator's backend uses.

No API server can be installed here, so this serves apps/v1 Deployments (and their scale and
status subresources), v1 Services and Pods with the real JSON shapes, applies merge patches, and
validates every object it stores against the official OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors). A "kubelet" makes a scaled-up Deployment ready after
`ready_after` status reads and gives it a Ready pod; `fail` answers chosen calls with an error
Status (409, 500...).
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
from aiohttp import web

from agent.coordinator.names import DEFAULT_SERVICE, SIZE_LABEL, deployment_name

K8S_VERSION = "1.30"


def deployment(name: str, size: int, namespace: str, replicas: int) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "triton-throttllem", SIZE_LABEL: str(size)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "triton",
                            "image": "nvcr.io/nvidia/tritonserver:24.08-trtllm-python-py3",
                            "resources": {"limits": {"nvidia.com/gpu": str(size)}},
                        },
                        {
                            "name": "throttllem",
                            "image": "throttllem:0.1.0",
                            "ports": [{"containerPort": 9401}],
                        },
                    ]
                },
            },
        },
        "status": {},
    }


def service(name: str, namespace: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"app.kubernetes.io/name": "triton-throttllem", SIZE_LABEL: str(size)},
            "ports": [{"name": "http", "port": 8000, "targetPort": 9000}],
        },
    }


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch (strategic merge is the same for the maps patched here)."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ApiServer:
    """The Deployment of each size and the Service, named as `deploy/k8s/engines` names them."""

    def __init__(
        self, namespace: str, sizes: dict[int, int], routed: int, pod_ip: str, ready_after: int = 1
    ) -> None:
        self.namespace = namespace
        self.deployments = {
            deployment_name(s): deployment(deployment_name(s), s, namespace, r) for s, r in sizes.items()
        }
        for obj in self.deployments.values():
            if obj["spec"]["replicas"]:
                obj["status"] = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}
        self.services = {DEFAULT_SERVICE: service(DEFAULT_SERVICE, namespace, routed)}
        self.pod_ip = pod_ip
        self.ready_after = ready_after
        self._reads: dict[str, int] = {}
        self.fail: dict[
            tuple[str, str], int
        ] = {}  # (method, "deployments/scale" | "services" ...) -> HTTP status
        self.validated = 0
        self.leases: dict[str, dict[str, Any]] = {}
        self.calls: set[tuple[str, str, str]] = set()  # (API group, resource, RBAC verb) of every request
        self.named_calls: set[tuple[str, str, str, str | None]] = set()  # ... and the object's name
        self._version = 0
        self.content_types: set[str] = set()
        for obj in [*self.deployments.values(), *self.services.values()]:
            self._validate(obj)

    def app(self) -> web.Application:
        app = web.Application()
        apps = "/apis/apps/v1/namespaces/{ns}/deployments/{name}"
        app.router.add_get(apps, self.get_deployment)
        app.router.add_get(apps + "/status", self.get_deployment_status)
        app.router.add_patch(apps + "/scale", self.patch_scale)
        app.router.add_get("/api/v1/namespaces/{ns}/services/{name}", self.get_service)
        app.router.add_patch("/api/v1/namespaces/{ns}/services/{name}", self.patch_service)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.list_pods)
        leases = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
        app.router.add_get(leases + "/{name}", self.get_lease)
        app.router.add_put(leases + "/{name}", self.replace_lease)
        app.router.add_post(leases, self.create_lease)
        return app

    async def get_lease(self, request: web.Request) -> web.Response:
        def lease() -> dict[str, Any]:
            self._namespace(request)
            name = request.match_info["name"]
            if name not in self.leases:
                raise _NotFound(f'leases.coordination.k8s.io "{name}" not found')
            return self.leases[name]

        return self._answer(request, "leases", lease)

    async def create_lease(self, request: web.Request) -> web.Response:
        body = await request.json()

        def create() -> dict[str, Any]:
            self._namespace(request)
            name = body["metadata"]["name"]
            if name in self.leases:
                raise _Conflict(f'leases.coordination.k8s.io "{name}" already exists')
            return self._store_lease(name, body)

        return self._answer(request, "leases", create)

    async def replace_lease(self, request: web.Request) -> web.Response:
        body = await request.json()

        def replace() -> dict[str, Any]:
            self._namespace(request)
            name = request.match_info["name"]
            current = self.leases.get(name)
            if current is None:
                raise _NotFound(f'leases.coordination.k8s.io "{name}" not found')
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                raise _Conflict(
                    "the object has been modified; please apply your changes to the latest version"
                )
            return self._store_lease(name, body)

        return self._answer(request, "leases", replace)

    def _store_lease(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        lease = {**body, "apiVersion": "coordination.k8s.io/v1", "kind": "Lease"}
        lease["metadata"] = {**body["metadata"], "resourceVersion": str(self._version)}
        self._validate(lease)
        self.leases[name] = lease
        return lease

    # --- handlers ---------------------------------------------------------------------------

    async def get_deployment(self, request: web.Request) -> web.Response:
        return self._answer(request, "deployments", lambda: self._deployment(request))

    async def get_deployment_status(self, request: web.Request) -> web.Response:
        def status() -> dict[str, Any]:
            obj = self._deployment(request)
            name = obj["metadata"]["name"]
            if obj["spec"]["replicas"] and not obj["status"].get("readyReplicas"):
                self._reads[name] = self._reads.get(name, 0) + 1
                if self._reads[name] >= self.ready_after:  # the kubelet's pod passed its probes
                    obj["status"] = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}
            return obj

        return self._answer(request, "deployments/status", status)

    async def patch_scale(self, request: web.Request) -> web.Response:
        body = await self._patch_body(request)

        def scale() -> dict[str, Any]:
            obj = self._deployment(request)
            current = {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {"name": obj["metadata"]["name"], "namespace": self.namespace},
                "spec": {"replicas": obj["spec"]["replicas"]},
            }
            patched = merge(current, body)
            self._validate(patched)
            replicas = patched["spec"]["replicas"]
            obj["spec"]["replicas"] = replicas
            if replicas == 0:
                obj["status"] = {}
                self._reads.pop(obj["metadata"]["name"], None)
            self._validate(obj)
            return patched

        return self._answer(request, "deployments/scale", scale)

    async def get_service(self, request: web.Request) -> web.Response:
        return self._answer(request, "services", lambda: self._service(request))

    async def patch_service(self, request: web.Request) -> web.Response:
        body = await self._patch_body(request)

        def patch() -> dict[str, Any]:
            name = request.match_info["name"]
            patched = merge(self._service(request), body)
            self._validate(patched)
            self.services[name] = patched
            return patched

        return self._answer(request, "services", patch)

    async def list_pods(self, request: web.Request) -> web.Response:
        def pods() -> dict[str, Any]:
            key, _, value = request.query.get("labelSelector", "").partition("=")
            items = []
            for obj in self.deployments.values():
                labels = obj["spec"]["template"]["metadata"]["labels"]
                if obj["status"].get("readyReplicas") and labels.get(key) == value:
                    items.append(self._pod(obj, labels))
            listing = {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            self._validate(listing)
            return listing

        return self._answer(request, "pods", pods)

    # --- helpers ----------------------------------------------------------------------------

    def _pod(self, obj: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{obj['metadata']['name']}-0",
                "namespace": self.namespace,
                "labels": labels,
            },
            "spec": obj["spec"]["template"]["spec"],
            "status": {
                "phase": "Running",
                "podIP": self.pod_ip,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    def _deployment(self, request: web.Request) -> dict[str, Any]:
        self._namespace(request)
        name = request.match_info["name"]
        if name not in self.deployments:
            raise _NotFound(f'deployments.apps "{name}" not found')
        return self.deployments[name]

    def _service(self, request: web.Request) -> dict[str, Any]:
        self._namespace(request)
        name = request.match_info["name"]
        if name not in self.services:
            raise _NotFound(f'services "{name}" not found')
        return self.services[name]

    def _namespace(self, request: web.Request) -> None:
        if request.match_info["ns"] != self.namespace:
            raise _NotFound(f'namespaces "{request.match_info["ns"]}" not found')

    async def _patch_body(self, request: web.Request) -> dict[str, Any]:
        self.content_types.add(request.content_type)
        if request.content_type not in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            raise web.HTTPUnsupportedMediaType(text=f"patch type {request.content_type} is not served here")
        body = await request.json()
        assert isinstance(body, dict)
        return body

    def _validate(self, obj: dict[str, Any]) -> None:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        self.validated += 1

    def _answer(self, request: web.Request, resource: str, produce: Any) -> web.Response:
        verb = {
            "GET": "list" if resource == "pods" else "get",
            "PATCH": "patch",
            "POST": "create",
            "PUT": "update",
        }
        group = (
            "apps"
            if resource.startswith("deployments")
            else "coordination.k8s.io"
            if resource == "leases"
            else ""
        )
        self.calls.add((group, resource, verb[request.method]))
        self.named_calls.add((group, resource, verb[request.method], request.match_info.get("name")))
        failure = self.fail.pop((request.method, resource), None)
        if failure is not None:
            return _status(failure, "Conflict" if failure == 409 else "InternalError", f"injected {failure}")
        try:
            return web.json_response(produce())
        except _NotFound as err:
            return _status(404, "NotFound", str(err))
        except _Conflict as err:
            return _status(409, "Conflict", str(err))


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)
