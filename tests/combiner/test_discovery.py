"""Discovery through the Kubernetes API: k8s:/// targets follow a Service's EndpointSlices.

No API server can run here, so these tests point the official `kubernetes` client at a FAKE
Kubernetes API server (`FakeKubeApiServer` below, http.server on loopback) that speaks the
list/watch protocol for discovery.k8s.io/v1 EndpointSlices: a list answers with the objects and
the collection's resourceVersion; a watch (`watch=true&resourceVersion=RV`) streams
newline-delimited JSON events (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR) over a chunked
response. The objects are recorded from a kind cluster's EndpointSlice controller (names, uids
and addresses shortened). The fake can expire watches (an ERROR event with code 410 Gone, and
410 for resourceVersions older than the expiry), drop watch connections, and stop and start
again on the same port (its watch cache then starts afresh, like a restarted API server).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from eftmesh.combiner.discovery import (
    NOT_READY,
    READY,
    TERMINATING,
    EndpointSliceWatcher,
    K8sTarget,
    endpoint_states,
    kube_api_client,
    parse_k8s_target,
)
from conftest import mark_live
from eftmesh.combiner.replicas import ReplicaSet, parse_target
from eftmesh.combiner.server import parse_args

NS = "mesh"
SERVICE = "eftmesh-base-large"
PORT = 50051


# --- recorded EndpointSlice objects (discovery.k8s.io/v1) --------------------------------------

def endpoint(ip: str, pod: str, ready: bool = True, serving: bool = True, terminating: bool = False) -> dict:
    return {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": NS, "name": pod, "uid": f"7c1d2f0e-{pod[-5:]}"},
        "nodeName": "kind-worker",
        "zone": "zone-a",
    }


def endpoint_slice(name: str, endpoints: list[dict], service: str = SERVICE, port: int = PORT) -> dict:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": NS,
            "uid": f"2b4a9c51-{name[-5:]}",
            "resourceVersion": "0",  # set by the server
            "generation": 1,
            "creationTimestamp": "2025-05-09T07:35:25Z",
            "labels": {
                "app.kubernetes.io/name": "eftmesh",
                "app.kubernetes.io/component": "logit-base-large",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
                "service.kubernetes.io/headless": "",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-05-09T07:36:02Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": "d0f3a1b2-91c4", "controller": True, "blockOwnerDeletion": True}],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "grpc", "protocol": "TCP", "port": port, "appProtocol": "kubernetes.io/h2c"}],
    }


POD_A = ("10.244.1.17", "eftmesh-base-large-6d9f7c5b8-x2k4p")
POD_B = ("10.244.2.23", "eftmesh-base-large-6d9f7c5b8-q7m9z")
POD_C = ("10.244.3.31", "eftmesh-base-large-6d9f7c5b8-h5n2w")
A, B, C = (f"{ip}:{PORT}" for ip, _ in (POD_A, POD_B, POD_C))


# --- the FAKE Kubernetes API server ------------------------------------------------------------

class FakeKubeApiServer:
    """A FAKE Kubernetes API server, only for these tests: EndpointSlice list and watch."""

    PATH = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"

    def __init__(self) -> None:
        self.port = 0
        self._cond = threading.Condition()
        self._rv = 1000
        self._objects: dict[tuple[str, str], dict] = {}
        self._log: list[tuple[int, str, dict]] = []  # (resourceVersion, event type, object)
        self._oldest = 0  # a watch from a resourceVersion below this gets 410 Gone
        self._expiries = 0  # bumped: every open watch gets an ERROR 410 event and ends
        self._drops = 0  # bumped: every open watch's connection is cut
        self._httpd: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()
        self.lists = 0
        self.watches = 0  # watch requests served
        self.open_watches = 0

    # state
    def apply(self, obj: dict) -> None:
        with self._cond:
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            kind = "MODIFIED" if key in self._objects else "ADDED"
            self._objects[key] = obj
            self._log.append((self._rv, kind, obj))
            self._cond.notify_all()

    def delete(self, name: str) -> None:
        with self._cond:
            self._rv += 1
            obj = copy.deepcopy(self._objects.pop((NS, name)))
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._log.append((self._rv, "DELETED", obj))
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._cond:
            self._rv += 1
            obj = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                   "metadata": {"resourceVersion": str(self._rv), "creationTimestamp": None}}
            self._log.append((self._rv, "BOOKMARK", obj))
            self._cond.notify_all()

    def expire(self) -> None:
        """Compact: resourceVersions before the current one are too old; open watches get ERROR 410."""
        with self._cond:
            self._oldest = self._rv
            self._expiries += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        with self._cond:
            self._drops += 1
            self._cond.notify_all()

    # life
    def start(self) -> FakeKubeApiServer:
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def get_request(self):
                conn, addr = super().get_request()
                with fake._cond:
                    fake._sockets.add(conn)
                return conn, addr

        self._httpd = Server(("127.0.0.1", self.port), self._handler())
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop like a killed API server: every connection cut, the port closed."""
        assert self._httpd is not None
        with self._cond:
            self._drops += 1
            self._cond.notify_all()
            sockets, self._sockets = list(self._sockets), set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = None

    def restart(self) -> None:
        self.stop()
        with self._cond:
            self._oldest = self._rv  # a fresh watch cache
        self.start()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                parts = url.path.split("/")  # '', apis, discovery.k8s.io, v1, namespaces, NS, endpointslices
                if len(parts) != 7 or parts[1:5] != ["apis", "discovery.k8s.io", "v1", "namespaces"] \
                        or parts[6] != "endpointslices":
                    return self._json(404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                            "message": "the server could not find the requested resource",
                                            "reason": "NotFound", "code": 404})
                ns = parts[5]
                selector = dict(s.split("=", 1) for s in q.get("labelSelector", "").split(",") if s)

                def selected(obj: dict) -> bool:
                    labels = obj["metadata"].get("labels") or {}
                    return obj["metadata"].get("namespace") == ns and \
                        all(labels.get(k) == v for k, v in selector.items())

                if q.get("watch") in ("true", "1"):
                    try:
                        return self._watch(q, selected)
                    finally:
                        with fake._cond:
                            fake.open_watches -= 1
                with fake._cond:
                    fake.lists += 1
                    items = [o for o in fake._objects.values() if selected(o)]
                    body = {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                            "metadata": {"resourceVersion": str(fake._rv)}, "items": items}
                self._json(200, body)

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, event: dict) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _gone(self, message: str) -> None:
                self._chunk({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": "Expired", "code": 410}})
                self.wfile.write(b"0\r\n\r\n")

            def _watch(self, q: dict, selected: Callable[[dict], bool]) -> None:
                with fake._cond:
                    fake.watches += 1
                    fake.open_watches += 1
                    expiries, drops = fake._expiries, fake._drops
                since = int(q.get("resourceVersion") or 0)
                bookmarks = q.get("allowWatchBookmarks") == "true"
                deadline = time.monotonic() + int(q.get("timeoutSeconds") or 1800)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if since < fake._oldest:
                    return self._gone(f"too old resource version: {since} ({fake._oldest})")
                while True:
                    with fake._cond:
                        fake._cond.wait_for(
                            lambda since=since: fake._drops != drops or fake._expiries != expiries
                            or (fake._log and fake._log[-1][0] > since) or time.monotonic() > deadline,
                            timeout=0.2)
                        if fake._drops != drops:  # cut, no final chunk
                            self.close_connection = True
                            try:
                                self.connection.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                            return None
                        if fake._expiries != expiries:
                            self.close_connection = True
                            return self._gone(f"too old resource version: {since} ({fake._oldest})")
                        new = [e for e in fake._log if e[0] > since]
                    for rv, kind, obj in new:
                        since = rv
                        if kind == "BOOKMARK" and bookmarks or kind != "BOOKMARK" and selected(obj):
                            self._chunk({"type": kind, "object": obj})
                    if time.monotonic() > deadline:
                        self.wfile.write(b"0\r\n\r\n")
                        return None

        return Handler


# --- helpers ----------------------------------------------------------------------------------

class FakeChannel:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def fake_stub(address: str) -> tuple[FakeChannel, str]:
    return FakeChannel(), f"stub:{address}"


class Changes:
    """A watcher listener that lets a test wait for a condition after each change."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0

    def __call__(self) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float = 3.0, what: str = "") -> float:
        """Wait until pred() holds (checked at every change, and every 50 ms); seconds taken."""
        started = time.monotonic()
        while not pred():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not within {timeout} s: {what or pred}")
            with self.cond:
                self.cond.wait(0.05)
        return time.monotonic() - started


@pytest.fixture
def api():
    from kubernetes import client

    fake = FakeKubeApiServer()
    fake.apply(endpoint_slice(f"{SERVICE}-7xk2p", [endpoint(*POD_A), endpoint(*POD_B)]))
    fake.apply(endpoint_slice(f"{SERVICE}-m4q8r", [endpoint(*POD_C, ready=False, serving=False)]))
    fake.apply(endpoint_slice("other-service-abcde", [endpoint("10.244.9.9", "other-0")], service="other"))
    fake.start()
    api_client = client.ApiClient(client.Configuration(host=fake.host))
    yield fake, api_client
    if fake._httpd is not None:
        fake.stop()


def watch(api_client, **kwargs) -> tuple[EndpointSliceWatcher, Changes]:
    changes = Changes()
    kwargs = {"request_timeout_s": 2.0, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, **kwargs}
    w = EndpointSliceWatcher(K8sTarget(SERVICE, NS, PORT), api_client=api_client, on_change=changes, **kwargs)
    return w, changes


def replica_set(api_client, **kwargs) -> tuple[ReplicaSet, EndpointSliceWatcher, Changes]:
    w, changes = watch(api_client, **kwargs)
    rs = ReplicaSet("base-large", f"k8s:///{SERVICE}.{NS}:{PORT}", fake_stub, watcher=w)
    for r in rs.replicas():
        mark_live(rs, r.address)
    return rs, w, changes


def with_pod(fake: FakeKubeApiServer, slice_name: str, pods: list[dict]) -> None:
    fake.apply(endpoint_slice(slice_name, pods))


# --- targets and states, no server ------------------------------------------------------------

@pytest.mark.parametrize("target, want", [
    ("k8s:///svc.ns:50051", K8sTarget("svc", "ns", 50051)),
    ("k8s:///svc:grpc", K8sTarget("svc", None, "grpc")),
    ("k8s:///eftmesh-base-large.mesh:grpc", K8sTarget("eftmesh-base-large", "mesh", "grpc")),
])
def test_k8s_targets_parse(target, want):
    assert parse_k8s_target(target) == want
    assert parse_target(target) == ("k8s", [target[len("k8s:///"):]])


@pytest.mark.parametrize("target", ["k8s:///svc", "k8s:///svc.ns", "k8s:///.ns:1", "k8s:///svc.:1",
                                    "k8s:///svc.ns.svc.cluster.local:1", "k8s:///svc.ns:"])
def test_bad_k8s_targets_say_what_to_write(target):
    with pytest.raises(ValueError, match=r"k8s:///SERVICE\.NAMESPACE:PORT"):
        parse_target(target)
    with pytest.raises(SystemExit):
        parse_args(["--upstream", f"base-large={target}", "--tokenizer", "x", "--no-default-delta"], environ={})


def test_the_combiner_accepts_a_k8s_target():
    parse_args(["--upstream", "base-large=k8s:///eftmesh-base-large.mesh:50051", "--tokenizer", "x",
                "--no-default-delta"], environ={})


def test_endpoint_conditions_give_states():
    s = endpoint_slice("s-1", [
        endpoint("10.0.0.1", "p-00001"),
        endpoint("10.0.0.2", "p-00002", ready=False, serving=True, terminating=True),
        endpoint("10.0.0.3", "p-00003", ready=False, serving=False, terminating=True),
        endpoint("10.0.0.4", "p-00004", ready=False, serving=False),
        {"addresses": ["10.0.0.5"], "conditions": {}},  # unset conditions: ready
    ])
    v6 = endpoint_slice("s-2", [endpoint("fd00::7", "p-00007")])
    v6["addressType"] = "IPv6"
    fqdn = endpoint_slice("s-3", [endpoint("logit.example.com", "p-00008")])
    fqdn["addressType"] = "FQDN"
    want = {"10.0.0.1:50051": READY, "10.0.0.2:50051": TERMINATING, "10.0.0.3:50051": TERMINATING,
            "10.0.0.4:50051": NOT_READY, "10.0.0.5:50051": READY, "[fd00::7]:50051": READY}
    assert endpoint_states([s, v6, fqdn], 50051) == want
    assert endpoint_states([s, v6, fqdn], "grpc") == want  # the port by name, from the slice
    assert endpoint_states([s], "metrics") == {}
    # an address in two slices (the controller moving it) takes its best state
    assert endpoint_states([s, endpoint_slice("s-4", [endpoint("10.0.0.4", "p-00004")])], PORT)["10.0.0.4:50051"] == READY


# --- against the FAKE API server --------------------------------------------------------------

def test_the_first_list_gives_the_ready_replicas(api):
    fake, api_client = api
    rs, w, _ = replica_set(api_client)
    try:
        assert w.endpoints() == {A: READY, B: READY, C: NOT_READY}  # not the other Service's slice
        assert sorted(r.address for r in rs.replicas()) == [A, B]  # C is not ready: no channel yet
        assert fake.lists == 1
    finally:
        rs.close()


def test_a_terminating_pod_gets_no_new_sessions_and_keeps_its_pinned_ones(api):
    fake, api_client = api
    rs, w, changes = replica_set(api_client)
    try:
        pinned = {s: rs.route(s).address for s in ("s1", "s2")}
        on_a = next(s for s, a in pinned.items() if a == A)
        replica_a = next(r for r in rs.replicas() if r.address == A)
        with_pod(fake, f"{SERVICE}-7xk2p", [endpoint(*POD_A, ready=False, serving=True, terminating=True),
                                             endpoint(*POD_B)])
        took = changes.wait(lambda: replica_a.draining, what="A draining")
        assert took < 1.0
        assert replica_a.membership == TERMINATING and not replica_a.channel.closed
        assert rs.route(on_a) is replica_a  # its KV cache stays where it is
        assert {rs.route(f"new{i}").address for i in range(4)} == {B}  # no new session on A
        rs.unpin(on_a)
        rs.refresh()
        assert replica_a.channel.closed and A not in rs.load()  # drained: closed once empty
        # the pod goes: its endpoint leaves the slice; a new pod turns ready and is added
        with_pod(fake, f"{SERVICE}-7xk2p", [endpoint(*POD_B)])
        with_pod(fake, f"{SERVICE}-m4q8r", [endpoint(*POD_C)])
        changes.wait(lambda: sorted(rs.load()) == [B, C], what="C added")
        assert rs.watcher is w and w.events == 3 and fake.lists == 1  # by the watch, no re-list
    finally:
        rs.close()


def test_a_deleted_endpoint_or_slice_is_removed(api):
    fake, api_client = api
    rs, _, changes = replica_set(api_client)
    try:
        held = rs.route("s1")
        other = A if held.address == B else B
        pods = {A: POD_A, B: POD_B}
        with_pod(fake, f"{SERVICE}-7xk2p", [endpoint(*pods[held.address])])
        changes.wait(lambda: other not in rs.load(), what=f"{other} removed")
        assert rs.route("s1") is held
        fake.delete(f"{SERVICE}-7xk2p")
        changes.wait(lambda: held.draining and held.membership == "gone", what="slice deleted")
        assert rs.route("s1") is held  # a session still pinned there keeps it until it ends
        rs.unpin("s1")
        rs.refresh()
        assert rs.load() == {} and held.channel.closed
        with pytest.raises(LookupError):
            rs.route("s2")
    finally:
        rs.close()


def test_an_expired_watch_lists_again_and_goes_on(api):
    fake, api_client = api
    rs, w, changes = replica_set(api_client)
    try:
        changes.wait(lambda: fake.open_watches == 1, what="the watch open")
        fake.expire()  # ERROR 410 to the open watch; its resourceVersion is now too old
        changes.wait(lambda: fake.lists == 2 and fake.watches >= 2, what="a re-list after 410")
        assert w.failures == 0  # an expiry is routine, not a failure
        with_pod(fake, f"{SERVICE}-m4q8r", [endpoint(*POD_C)])
        changes.wait(lambda: C in rs.load(), what="the watch goes on after the re-list")
    finally:
        rs.close()


def test_a_dropped_watch_connection_is_survived(api):
    fake, api_client = api
    rs, w, changes = replica_set(api_client)
    try:
        changes.wait(lambda: fake.open_watches == 1, what="the watch open")
        fake.drop_watches()
        with_pod(fake, f"{SERVICE}-m4q8r", [endpoint(*POD_C)])  # while the watch is down
        changes.wait(lambda: C in rs.load(), what="the change made while the watch was down")
        with_pod(fake, f"{SERVICE}-m4q8r", [endpoint(*POD_C, ready=False, serving=False, terminating=True)])
        changes.wait(lambda: C not in rs.load(), what="a later change by the new watch")
    finally:
        rs.close()


def test_an_api_server_restart_is_survived(api):
    fake, api_client = api
    rs, w, changes = replica_set(api_client)
    try:
        fake.stop()
        changes.wait(lambda: w.failures >= 2, what="the watcher to notice the API server gone")
        assert sorted(rs.load()) == [A, B]  # the last known replicas stay while it is away
        with_pod(fake, f"{SERVICE}-7xk2p", [endpoint(*POD_B)])  # A goes while the API server is down
        fake.start()  # same port; its watch cache starts afresh
        changes.wait(lambda: sorted(rs.load()) == [B], timeout=5.0, what="the state after the restart")
        with_pod(fake, f"{SERVICE}-m4q8r", [endpoint(*POD_C)])
        changes.wait(lambda: sorted(rs.load()) == [B, C], what="the watch after the restart")
        fake.restart()  # a restart with the watcher connected: the watch is cut, then 410 or a re-list
        with_pod(fake, f"{SERVICE}-7xk2p", [endpoint(*POD_A), endpoint(*POD_B)])
        changes.wait(lambda: sorted(rs.load()) == [A, B, C], timeout=5.0, what="after a second restart")
    finally:
        rs.close()


def test_a_watch_the_server_ends_resumes_without_a_re_list(api):
    fake, api_client = api
    w, changes = watch(api_client, watch_timeout_s=1)
    w.start()
    try:
        assert w.wait_synced(3.0)
        changes.wait(lambda: fake.watches >= 2, what="a second watch after the first timed out")
        fake.bookmark()
        changes.wait(lambda: w.resource_version == str(fake._rv), what="the bookmark's resourceVersion")
        count = changes.count
        with_pod(fake, f"{SERVICE}-m4q8r", [endpoint(*POD_C)])
        changes.wait(lambda: changes.count > count and w.endpoints()[C] == READY, what="the next change")
        assert fake.lists == 1
    finally:
        w.stop()


def test_a_kubeconfig_reaches_the_api_server_and_no_access_fails_at_start(api, tmp_path):
    fake, _ = api
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.host}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nobody", "namespace": NS}}],
        "users": [{"name": "nobody", "user": {}}],
    }))
    w, _ = watch(kube_api_client(str(kubeconfig)))
    try:
        assert w.start().wait_synced(3.0) and w.endpoints()[A] == READY
    finally:
        w.stop()
    with pytest.raises(Exception, match="kube-config"):
        kube_api_client(str(tmp_path / "absent"))
