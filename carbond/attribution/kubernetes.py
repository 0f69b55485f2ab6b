"""Pod names for cgroups: a background-refreshed map from pod UID and container ID to namespace and names.

Two sources, one format (a ``v1`` PodList):

- ``apiserver`` (default): ``GET {api_url}/api/v1/pods?fieldSelector=spec.nodeName=<node>``, only this node's
  pods. RBAC: ``get, list`` on ``pods`` (the shipped ClusterRole). Chosen as default because the kubelet's ``/pods``
  is authorised as ``nodes/proxy``, a far broader grant than reading pod metadata.
- ``kubelet``: ``GET {kubelet_url}/pods`` on the node's own kubelet (no API-server load; RBAC ``get`` on
  ``nodes/proxy``; kubelets often serve a self-signed certificate).

Pod labels come with the pods; namespace labels (only when ``attribution.labels.namespaces`` lists some) from
``GET {api_url}/api/v1/namespaces`` (RBAC: ``list`` on ``namespaces``), whichever source lists the pods. Each pod's
team, project and copied labels are resolved once per refresh (:class:`~carbond.attribution.labels.LabelPolicy`).

The service-account token is re-read before each request (projected tokens rotate). A failed refresh keeps the
last good map, is counted, and is logged once per failure streak; lookups never block and never fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from carbond.attribution.labels import DEFAULT_POLICY, LabelPolicy, Pairs
from carbond.logs import get_logger

log = get_logger("carbond.attribution.kubernetes")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_BODY = 64 << 20
REFRESH_S = 30.0  # default of attribution.kubernetes.refresh_secs
MIRROR = "kubernetes.io/config.mirror"  # on a static pod's mirror in the API: the static pod's UID (its config hash)


@dataclass(frozen=True, slots=True)
class PodNames:
    namespace: str
    name: str
    containers: dict[str, str]  # container ID (hex, runtime prefix stripped) -> container name
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PodMeta:
    """What the cgroup series of a pod carry from Kubernetes (resolved once per refresh)."""

    namespace: str
    name: str
    containers: dict[str, str]
    team: str = ""
    project: str = ""
    extra: Pairs = ()


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}


def _annotations(meta: dict[str, Any]) -> dict[str, str]:
    found = meta.get("annotations")
    return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}


def parse_namespace_list(doc: Any) -> dict[str, dict[str, str]]:
    """Namespace name -> its labels, from a NamespaceList document; malformed items are skipped."""
    out: dict[str, dict[str, str]] = {}
    items = doc.get("items") if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else []:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            out[meta["name"]] = _labels(meta)
    return out


def parse_pod_list(doc: Any) -> dict[str, PodNames]:
    """Pod UID -> names, from a PodList document; malformed items are skipped. A static pod's mirror (whose API UID
    is not the one its cgroup is named by) is also listed under the UID its ``kubernetes.io/config.mirror``
    annotation gives, the static pod's own (the kubelet's ``/pods`` lists the static pod under it already)."""
    pods: dict[str, PodNames] = {}
    items = doc.get("items") if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        meta = item.get("metadata")
        status = item.get("status")
        if not isinstance(meta, dict):
            continue
        uid, name, ns = meta.get("uid"), meta.get("name"), meta.get("namespace")
        if not (isinstance(uid, str) and isinstance(name, str) and isinstance(ns, str)):
            continue
        containers: dict[str, str] = {}
        if isinstance(status, dict):
            for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
                entries = status.get(key)
                for c in entries if isinstance(entries, list) else []:
                    if not isinstance(c, dict):
                        continue
                    cid, cname = c.get("containerID"), c.get("name")
                    if isinstance(cid, str) and isinstance(cname, str):
                        containers[cid.rpartition("://")[2]] = cname
        names = PodNames(ns, name, containers, _labels(meta))
        pods[uid.lower()] = names
        static = _annotations(meta).get(MIRROR)  # a mirror pod: its static pod's cgroup is named by this hash
        if static:
            pods.setdefault(static.lower(), names)
    return pods


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    token_file: Path | None
    ca_file: Path | None
    insecure_skip_tls_verify: bool = False
    namespaces_url: str = ""  # the API server's namespace list


def endpoint(
    source: str,
    node_name: str,
    *,
    api_url: str | None = None,
    kubelet_url: str | None = None,
    token_file: Path | None = SA_DIR / "token",
    ca_file: Path | None = SA_DIR / "ca.crt",
    insecure_skip_tls_verify: bool = False,
) -> Endpoint:
    """The URL to list this node's pods from, in-cluster defaults filled from the environment."""
    if api_url is None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        api_url = f"https://{host}:{port}" if host else "https://kubernetes.default.svc"
    if source == "kubelet":
        base = kubelet_url or f"https://{os.environ.get('HOST_IP') or node_name}:10250"
        url = base.rstrip("/") + "/pods"
    else:
        selector = quote(f"spec.nodeName={node_name}", safe="")
        url = f"{api_url.rstrip('/')}/api/v1/pods?fieldSelector={selector}"
    return Endpoint(url, token_file, ca_file, insecure_skip_tls_verify, f"{api_url.rstrip('/')}/api/v1/namespaces")


class PodDirectory:
    """The names (and copied labels) of this node's pods, refreshed every ``refresh_s`` by :meth:`run`.
    ``generation`` grows each time the map is replaced."""

    def __init__(
        self,
        ep: Endpoint,
        refresh_s: float = REFRESH_S,
        timeout_s: float = 10.0,
        policy: LabelPolicy = DEFAULT_POLICY,
    ) -> None:
        self.endpoint = ep
        self.policy = policy
        self._refresh = refresh_s
        self._timeout = timeout_s
        self._pods: dict[str, PodMeta] = {}
        self._namespaces: dict[str, dict[str, str]] = {}
        self.errors_total = 0
        self.generation = 0
        self._failing = False

    def lookup(self, pod_uid: str, container_id: str) -> tuple[str, str, str]:
        """(namespace, pod name, container name), empty strings where unknown."""
        pod = self._pods.get(pod_uid)
        if pod is None:
            return "", "", ""
        return pod.namespace, pod.name, pod.containers.get(container_id, "")

    def meta(self, pod_uid: str) -> PodMeta | None:
        """Everything known of a pod (None while unknown)."""
        return self._pods.get(pod_uid)

    def load(self, pods: Mapping[str, PodNames], namespaces: Mapping[str, dict[str, str]] | None = None) -> None:
        """Replace the map (a refresh's result): each pod's copied labels resolved through the policy."""
        if namespaces is not None:
            self._namespaces = dict(namespaces)
        ns_labels, policy = self._namespaces, self.policy
        resolved = {}
        for uid, p in pods.items():
            team, project, extra = policy.for_pod(p.labels, ns_labels.get(p.namespace, {}))
            resolved[uid] = PodMeta(p.namespace, p.name, p.containers, team, project, extra)
        self._pods = resolved
        self.generation += 1

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.endpoint.url.startswith("https:"):
            return False
        ctx = ssl.create_default_context()
        ca = self.endpoint.ca_file
        if ca is not None and ca.is_file():
            ctx.load_verify_locations(cafile=str(ca))
        if self.endpoint.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _get(self, session: Any, url: str, kind: str) -> dict[str, Any]:
        import json

        headers = {"Accept": "application/json"}
        tf = self.endpoint.token_file
        if tf is not None and tf.is_file():
            headers["Authorization"] = "Bearer " + tf.read_text().strip()
        async with session.get(url, headers=headers, ssl=self._ssl()) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status} from {url}")
            body = await resp.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise RuntimeError("response too large")
            doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("kind") not in (None, kind):
            raise RuntimeError(f"not a {kind}")
        return doc

    async def refresh(self) -> bool:
        """One refresh; True if the map was replaced. Namespace labels that cannot be listed keep their last
        values and count as a failed refresh, while the pods are still replaced."""
        import aiohttp

        url = self.endpoint.url
        namespaces = None
        try:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                pods = parse_pod_list(await self._get(session, url, "PodList"))
                if self.policy.wants_namespaces:
                    url = self.endpoint.namespaces_url
                    try:
                        namespaces = parse_namespace_list(await self._get(session, url, "NamespaceList"))
                    finally:
                        self.load(pods, namespaces)
                else:
                    self.load(pods)
        except (OSError, RuntimeError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
            self.errors_total += 1
            if not self._failing:
                self._failing = True
                log.warning("pod_names_refresh_failed", url=url, error=str(exc) or type(exc).__name__)
            return False
        if self._failing:
            self._failing = False
            log.info("pod_names_refresh_recovered", pods=len(self._pods))
        return True

    async def run(self) -> None:
        """Refresh until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh)


@contextlib.asynccontextmanager
async def running(directory: PodDirectory | None) -> AsyncIterator[None]:
    """Run ``directory``'s refresh loop (if any) for the duration of the block."""
    if directory is None:
        yield
        return
    task = asyncio.create_task(directory.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
