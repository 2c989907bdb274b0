"""A role's replicas found through the Kubernetes API: a watch on its Service's EndpointSlices.

`k8s:///SERVICE.NAMESPACE:PORT` (see replicas.parse_target) names the EndpointSlices
(discovery.k8s.io/v1) labelled `kubernetes.io/service-name=SERVICE` in NAMESPACE. An
`EndpointSliceWatcher` lists them, then watches them from the list's resourceVersion in a daemon
thread, keeps the current slices by name and calls its listeners at once on every change, so the
combiner reacts to a pod turning ready, not ready or terminating as the API server reports it
(no DNS polling, no DNS TTLs).

Each endpoint address gets a state:

    ready        conditions.ready is true (or unset): new sessions may go there
    terminating  conditions.terminating is true (serving or not): no new sessions; the sessions
                 pinned there stay until they end (the pod keeps serving them through its grace)
    not_ready    neither (starting, or failing its readiness probe): no new sessions

A watch that expires (410 Gone, as an ERROR event or an answer) is followed by a fresh list and a
watch from its resourceVersion; a dropped connection, an API server restart or any other error by
a list after a back-off (doubling, with jitter, up to `max_backoff_s`). The last known slices are
kept meanwhile: losing the API server does not lose the replicas.

RBAC: the combiner's ServiceAccount needs `get`, `list` and `watch` on `endpointslices` in API
group `discovery.k8s.io`, in each namespace it watches (a Role and RoleBinding; the watcher itself
only lists and watches).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

K8S_PREFIX = "k8s:///"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Where a pod finds its own namespace (the ServiceAccount token mount).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

READY, TERMINATING, NOT_READY = "ready", "terminating", "not_ready"
_RANK = {READY: 2, TERMINATING: 1, NOT_READY: 0}  # an address in two slices takes its best state


@dataclass(frozen=True)
class K8sTarget:
    """What `k8s:///SERVICE[.NAMESPACE]:PORT` names. `port` is the number dialled on every
    endpoint address, or the name of a port of the EndpointSlices (the Service port's name)."""

    service: str
    namespace: str | None  # None: the combiner pod's own namespace
    port: int | str

    @property
    def label_selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.service}"


def parse_k8s_target(target: str) -> K8sTarget:
    """`k8s:///SERVICE.NAMESPACE:PORT`, `k8s:///SERVICE:PORT` (the pod's own namespace); PORT is a
    number or a port name. Raises ValueError naming the syntax."""
    want = f"expected {K8S_PREFIX}SERVICE.NAMESPACE:PORT (PORT a number or a port name), got {target!r}"
    if not target.startswith(K8S_PREFIX):
        raise ValueError(want)
    name, sep, port = target[len(K8S_PREFIX):].rpartition(":")
    service, _, namespace = name.partition(".")
    if not sep or not service or not port or "." in namespace or "/" in name or (_ and not namespace):
        raise ValueError(want)
    return K8sTarget(service, namespace or None, int(port) if port.isdigit() else port)


def own_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (from its ServiceAccount mount), or `default` outside one."""
    try:
        return NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def kube_api_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient: the in-cluster ServiceAccount (token, CA, KUBERNETES_SERVICE_HOST) by
    default; a kubeconfig file (or $KUBECONFIG / ~/.kube/config) outside a cluster."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except config.ConfigException:
            log.info("not in a Kubernetes pod; trying a kubeconfig")
    # $KUBECONFIG read now: the client reads it once, when kubernetes.config is first imported.
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
    return client.ApiClient(cfg)


def endpoint_states(slices: Iterable[Mapping[str, Any]], port: int | str) -> dict[str, str]:
    """{host:port ([v6]:port): ready | terminating | not_ready} over EndpointSlice objects (as
    the API's JSON). Only an endpoint's first address is used (the API calls its addresses
    fungible); FQDN slices and slices without the named port are skipped."""
    out: dict[str, str] = {}
    for s in slices:
        kind = s.get("addressType")
        if kind not in ("IPv4", "IPv6"):
            continue
        if isinstance(port, int):
            number = port
        else:
            named = [p.get("port") for p in s.get("ports") or [] if p.get("name") == port and p.get("port")]
            if not named:
                continue
            number = named[0]
        for ep in s.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            c = ep.get("conditions") or {}
            if c.get("terminating") is True:
                state = TERMINATING
            elif c.get("ready") is False:  # unset means ready (the API's convention)
                state = NOT_READY
            else:
                state = READY
            host = addresses[0]
            address = f"[{host}]:{number}" if kind == "IPv6" else f"{host}:{number}"
            if address not in out or _RANK[state] > _RANK[out[address]]:
                out[address] = state
    return out


class EndpointSliceWatcher:
    """The current EndpointSlices of one Service, kept by a list-then-watch loop in a daemon
    thread; `endpoints()` gives {address: state}, listeners are called on every change."""

    def __init__(
        self,
        target: K8sTarget,
        api_client: Any = None,
        on_change: Callable[[], None] | None = None,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 10.0,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        """`api_client`: a kubernetes.client.ApiClient, or None for `kube_api_client()` (made by
        `start()`). `watch_timeout_s`: each watch request's server-side timeout, after
        which the watch resumes from the last resourceVersion (no re-list)."""
        self.target = target
        self.namespace = target.namespace or own_namespace()
        self._api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self._lock = threading.Lock()
        self._slices: dict[str, dict[str, Any]] = {}
        self._listeners: list[Callable[[], None]] = [on_change] if on_change else []
        self._synced = threading.Event()  # a first list has answered
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self.resource_version: str | None = None
        # Counters, for logs and tests.
        self.lists = 0
        self.events = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"EndpointSliceWatcher({self.target.service}.{self.namespace})"

    # --- what callers read ------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first list; False if it did not answer within `timeout`."""
        return self._synced.wait(timeout)

    def slices(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._slices)

    def endpoints(self) -> dict[str, str]:
        """{address: ready | terminating | not_ready} over the current slices."""
        with self._lock:
            slices = list(self._slices.values())
        return endpoint_states(slices, self.target.port)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn()` (in the watcher's thread) after every list and every change event."""
        with self._lock:
            self._listeners.append(fn)

    # --- life -------------------------------------------------------------------------------

    def start(self) -> EndpointSliceWatcher:
        """Make the API client (now: no access is an error at start-up, not a silent empty role)
        and start the list-and-watch thread."""
        if self._thread is None:
            if self._api_client is None:
                try:
                    self._api_client = kube_api_client()
                except Exception as e:
                    raise RuntimeError(
                        f"{self}: no Kubernetes API access (neither a pod's ServiceAccount nor a kubeconfig): {e}"
                    ) from e
            self._thread = threading.Thread(target=self._run, name=f"k8s-watch-{self.target.service}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop watching; waits up to `timeout` for the thread (a daemon: it never holds up exit)."""
        self._stopped.set()
        deadline = time.monotonic() + timeout
        while True:
            w = self._watch
            if w is not None:
                w.stop()  # shuts the open watch's socket down: a blocked read returns
            t = self._thread
            if t is None or t is threading.current_thread():
                return
            t.join(0.05)  # again if the watch was opening: its request did not exist yet
            if not t.is_alive() or time.monotonic() > deadline:
                return

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = self.initial_backoff_s
        from kubernetes import client

        self._api = client.DiscoveryV1Api(self._api_client)
        rv: str | None = None
        expired = 0  # 410s in a row with no event between them
        while not self._stopped.is_set():
            events = self.events
            try:
                if rv is None:
                    rv = self._list()
                    backoff = self.initial_backoff_s
                rv = self._watch_from(rv)  # returns when the server ends the watch: resume from rv
                expired = 0
            except ApiException as e:
                if self._stopped.is_set():
                    break
                if e.status == 410:  # the watch's resourceVersion is too old: list again
                    expired = expired + 1 if self.events == events else 1
                    log.info("%s: watch expired (410 Gone); listing again", self)
                    rv = None
                    if expired > 1:  # at once the first time; a server that keeps saying so, after a pause
                        backoff = self._pause(backoff)
                    continue
                self.failures += 1
                log.warning("%s: API server answered %s %s; listing again in %.1f s",
                            self, e.status, e.reason, backoff)
                rv = None
                backoff = self._pause(backoff)
            except Exception as e:  # connection refused / dropped, timeouts, API server restarts
                if self._stopped.is_set():
                    break
                self.failures += 1
                log.warning("%s: lost the API server (%s: %s); keeping the last %d slices, listing again in %.1f s",
                            self, type(e).__name__, e, len(self._slices), backoff)
                rv = None
                backoff = self._pause(backoff)

    def _pause(self, backoff: float) -> float:
        self._stopped.wait(backoff * random.uniform(0.8, 1.2))
        return min(backoff * 2, self.max_backoff_s)

    def _list(self) -> str:
        resp = self._api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.target.label_selector,
            _preload_content=False, _request_timeout=self.request_timeout_s,
        )
        try:
            if not 200 <= resp.status <= 299:
                from kubernetes.client.exceptions import ApiException

                raise ApiException(status=resp.status, reason=resp.reason)
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        slices = {s["metadata"]["name"]: s for s in body.get("items") or []}
        with self._lock:
            self._slices = slices
        self.lists += 1
        rv = body.get("metadata", {}).get("resourceVersion") or ""
        self.resource_version = rv
        first = not self._synced.is_set()
        self._synced.set()
        log.log(logging.INFO if first else logging.DEBUG, "%s: listed %d slices at resourceVersion %s: %s",
                self, len(slices), rv, self.endpoints())
        self._notify()
        return rv

    def _watch_from(self, rv: str) -> str:
        from kubernetes import watch

        self._watch = w = watch.Watch()
        if self._stopped.is_set():
            return rv
        stream = w.stream(
            self._api.list_namespaced_endpoint_slice, self.namespace,
            label_selector=self.target.label_selector, resource_version=rv, allow_watch_bookmarks=True,
            timeout_seconds=int(self.watch_timeout_s),
            # A read that hears nothing (not even a bookmark) past the server's own timeout means
            # a dead connection.
            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 30),
        )
        for event in stream:
            if self._stopped.is_set():
                break
            kind, obj = event.get("type"), event.get("raw_object") or {}  # the API's JSON
            meta = obj.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            self.resource_version = rv
            if kind == "BOOKMARK":
                continue
            name = meta.get("name")
            if kind in ("ADDED", "MODIFIED") and name:
                with self._lock:
                    self._slices[name] = obj
            elif kind == "DELETED" and name:
                with self._lock:
                    self._slices.pop(name, None)
            else:
                log.debug("%s: ignored watch event %s", self, kind)
                continue
            self.events += 1
            log.debug("%s: %s %s at %s", self, kind, name, rv)
            self._notify()
        return rv

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn()
            except Exception:  # a listener's bug must not stop discovery
                log.exception("%s: change listener failed", self)
