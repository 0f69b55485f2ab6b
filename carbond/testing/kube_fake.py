"""A loopback Kubernetes that serves real-shaped ``v1`` PodLists: the API server's
``/api/v1/pods?fieldSelector=spec.nodeName=...`` and the kubelet's ``/pods``, behind a bearer token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from carbond.testing.loopback import serve


@dataclass
class FakePod:
    uid: str
    name: str
    namespace: str
    node: str
    containers: dict[str, str] = field(default_factory=dict)  # name -> "containerd://<64hex>"
    qos: str = "Burstable"
    labels: dict[str, str] | None = None  # None: {"app": <the name without its two hashes>}
    annotations: dict[str, str] = field(default_factory=dict)  # e.g. a mirror pod's kubernetes.io/config.mirror

    def to_json(self) -> dict[str, Any]:
        return {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": "4711",
                "creationTimestamp": "2026-11-20T10:00:00Z",
                "labels": self.labels if self.labels is not None else {"app": self.name.rsplit("-", 2)[0]},
                **({"annotations": self.annotations} if self.annotations else {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "y"}],
            },
            "spec": {
                "nodeName": self.node,
                "containers": [{"name": n, "image": f"registry.invalid/{n}:1"} for n in self.containers],
            },
            "status": {
                "phase": "Running",
                "qosClass": self.qos,
                "hostIP": "10.0.0.7",
                "podIP": "10.244.1.9",
                "containerStatuses": [
                    {
                        "name": n,
                        "containerID": cid,
                        "ready": True,
                        "restartCount": 0,
                        "image": f"registry.invalid/{n}:1",
                        "imageID": "sha256:" + "0" * 64,
                        "state": {"running": {"startedAt": "2026-11-20T10:00:05Z"}},
                    }
                    for n, cid in self.containers.items()
                ],
            },
        }


class FakeKubernetes:
    def __init__(self, token: str = "sekret-token") -> None:
        self.token = token
        self.pods: list[FakePod] = []
        self.namespaces: dict[str, dict[str, str]] = {}  # name -> labels, for /api/v1/namespaces
        self.namespaces_status = 200  # e.g. 403: RBAC without list on namespaces
        self.requests: list[str] = []
        self.fail_with: int | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _pod_list(self, pods: list[FakePod]) -> dict[str, Any]:
        return {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "4712"},
            "items": [p.to_json() for p in pods],
        }

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(str(request.rel_url))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "status": "Failure", "code": 401}, status=401)
        if self.fail_with is not None:
            return web.json_response(
                {"kind": "Status", "status": "Failure", "code": self.fail_with}, status=self.fail_with
            )
        if request.path == "/api/v1/namespaces":
            if self.namespaces_status != 200:
                code = self.namespaces_status
                return web.json_response({"kind": "Status", "status": "Failure", "code": code}, status=code)
            items = [{"metadata": {"name": n, "labels": lab}} for n, lab in self.namespaces.items()]
            return web.json_response({"kind": "NamespaceList", "apiVersion": "v1", "items": items})
        pods = self.pods
        if request.path == "/api/v1/pods":
            selector = request.query.get("fieldSelector", "")
            if selector.startswith("spec.nodeName="):
                node = selector.partition("=")[2]
                pods = [p for p in pods if p.node == node]
        return web.json_response(self._pod_list(pods))

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._handle)
        app.router.add_get("/api/v1/namespaces", self._handle)
        app.router.add_get("/pods", self._handle)
        self._runner, self.url = await serve(app)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
