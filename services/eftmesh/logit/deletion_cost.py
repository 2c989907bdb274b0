"""Keep this pod's `controller.kubernetes.io/pod-deletion-cost` equal to the sessions it holds.

When a Deployment scales in, its ReplicaSet removes the pods with the lowest deletion cost first
(Kubernetes >= 1.22, beta and on by default). A logit pod holds KV caches of live generations,
each costing a re-prefill elsewhere when its pod goes, so the cheapest pod to remove is the one
holding the fewest sessions: a daemon thread PATCHes the pod's own annotation to its session
count every `--deletion-cost-interval` seconds, and only when the count changed.

The pod is named by the downward API (POD_NAME, POD_NAMESPACE; the Helm chart sets both) and
the API is reached with the in-cluster ServiceAccount (the chart's Role allows get and patch on
pods in the release namespace). Nothing here can affect serving: an API error is logged and
retried with exponential back-off, and the annotation is a hint (the ReplicaSet controller reads
it at scale-in, best effort; a stale value only picks a less ideal pod).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("eftmesh.logit.deletion_cost")

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# The annotation is an int32.
MAX_COST = 2**31 - 1
DEFAULT_INTERVAL_S = 10.0
MAX_BACKOFF_S = 300.0
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_interval(environ: Mapping[str, str]) -> float:
    """DEFAULT_INTERVAL_S in a Kubernetes pod (KUBERNETES_SERVICE_HOST set), else 0 (off)."""
    return DEFAULT_INTERVAL_S if environ.get("KUBERNETES_SERVICE_HOST") else 0.0


def in_cluster_api_client() -> Any:
    """An ApiClient for the pod's own ServiceAccount (token, CA, KUBERNETES_SERVICE_HOST)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


class DeletionCost:
    """A daemon thread keeping one pod's deletion-cost annotation equal to `sessions()`."""

    def __init__(self, sessions: Callable[[], int], pod: str, namespace: str, interval_s: float,
                 api_client: Any | None = None, max_backoff_s: float = MAX_BACKOFF_S) -> None:
        """`api_client`: a kubernetes.client.ApiClient (None: the in-cluster one, made on start)."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.sessions, self.pod, self.namespace = sessions, pod, namespace
        self.interval_s, self.max_backoff_s = interval_s, max(max_backoff_s, interval_s)
        self.api_client = api_client
        self.written: int | None = None  # the value the API last accepted
        self.failures = 0  # consecutive failed updates
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self) -> bool:
        """One round: PATCH the annotation if the session count differs from the value last
        written. Returns whether it PATCHed; raises what the API raised."""
        cost = max(0, min(int(self.sessions()), MAX_COST))
        if cost == self.written:
            return False
        from kubernetes import client

        body = {"metadata": {"annotations": {ANNOTATION: str(cost)}}}
        client.CoreV1Api(self.api_client).patch_namespaced_pod(
            self.pod, self.namespace, body, _content_type="application/merge-patch+json",
            _request_timeout=max(1.0, min(self.interval_s, 10.0)))
        self.written = cost
        return True

    def next_wait(self) -> float:
        """Seconds until the next round: the interval, doubled per consecutive failure up to
        max_backoff_s."""
        return min(self.interval_s * 2 ** min(self.failures, 30), self.max_backoff_s)

    def run_once(self) -> None:
        """One round that never raises: failures are counted and logged (the first one of a
        run of failures as a warning, the rest at debug, then one line when it recovers)."""
        try:
            if self.update():
                log.debug("%s/%s: %s=%s", self.namespace, self.pod, ANNOTATION, self.written)
        except Exception as e:  # noqa: BLE001 - nothing here may reach serving
            self.failures += 1
            (log.warning if self.failures == 1 else log.debug)(
                "cannot set %s on pod %s/%s (failure %d, next try in %.0f s): %s",
                ANNOTATION, self.namespace, self.pod, self.failures, self.next_wait(), _brief(e))
        else:
            if self.failures:
                log.info("%s on pod %s/%s set again after %d failures", ANNOTATION, self.namespace, self.pod,
                         self.failures)
            self.failures = 0

    def start(self) -> DeletionCost:
        if self.api_client is None:
            self.api_client = in_cluster_api_client()
        self._thread = threading.Thread(target=self._run, name="deletion-cost", daemon=True)
        self._thread.start()
        log.info("keeping %s of pod %s/%s equal to its sessions, every %.0f s", ANNOTATION, self.namespace,
                 self.pod, self.interval_s)
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.next_wait())


def _brief(e: BaseException) -> str:
    """An API error's status and reason, not its whole response (headers, body)."""
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    return f"{type(e).__name__} {status} {reason}" if status is not None else f"{type(e).__name__}: {e}"


def start_from_env(sessions: Callable[[], int], interval_s: float,
                   environ: Mapping[str, str] | None = None) -> DeletionCost | None:
    """Start the updater for this pod, or None: off (interval 0), or not possible here (no pod
    name, no in-cluster config), which is logged and never fatal."""
    if interval_s <= 0:
        return None
    env = os.environ if environ is None else environ
    pod = env.get("POD_NAME", "")
    namespace = env.get("POD_NAMESPACE", "")
    if not namespace:
        try:
            namespace = NAMESPACE_FILE.read_text().strip()
        except OSError:
            namespace = ""
    if not pod or not namespace:
        log.warning("--deletion-cost-interval %.0f: no POD_NAME / POD_NAMESPACE in the environment "
                    "(the downward API sets them); the pod's deletion cost is not kept", interval_s)
        return None
    try:
        return DeletionCost(sessions, pod, namespace, interval_s).start()
    except Exception as e:  # noqa: BLE001 - no in-cluster config, no kubernetes package
        log.warning("--deletion-cost-interval %.0f: cannot reach the Kubernetes API (%s); the pod's "
                    "deletion cost is not kept", interval_s, _brief(e))
        return None
