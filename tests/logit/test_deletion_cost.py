"""A logit pod keeps its own pod-deletion-cost annotation equal to the sessions it holds.

No API server can run here, so these tests point the official `kubernetes` client at a FAKE
Kubernetes API server (http.server in a thread, FakePodApi below) that only knows PATCH of one
pod's metadata (merge-patch or strategic-merge-patch JSON) and records every request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from eftmesh.logit import deletion_cost
from eftmesh.logit.deletion_cost import ANNOTATION, DeletionCost
from eftmesh.logit.server import parse_args

NAMESPACE, POD = "serving", "eft-eftmesh-logit-base-large-7d9f-abcde"
MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


class FakePodApi:
    """A FAKE Kubernetes API server, only for these tests: PATCH /api/v1/namespaces/NS/pods/NAME
    merges metadata.annotations into one stored pod and records the request; `fail_next` makes
    the next PATCHes answer an API error (a Status object) instead."""

    def __init__(self) -> None:
        self.pod = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": POD, "namespace": NAMESPACE, "annotations": {"keep": "me"}}}
        self.patches: list[tuple[str, str, dict]] = []  # (path, content type, body) of accepted PATCHes
        self.requests = 0
        self.fail_next = 0
        self.fail_code = 500
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ctype = self.headers.get("Content-Type", "")
                with fake.lock:
                    fake.requests += 1
                    if fake.fail_next:
                        fake.fail_next -= 1
                        return self._json(fake.fail_code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                           "message": "injected", "code": fake.fail_code})
                    if self.path.split("?")[0] != f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}":
                        return self._json(404, {"kind": "Status", "code": 404, "message": "not found"})
                    if ctype not in MERGE_TYPES or not isinstance(body, dict):
                        return self._json(415, {"kind": "Status", "code": 415, "message": f"bad patch {ctype}"})
                    fake.patches.append((self.path, ctype, body))
                    fake.pod["metadata"]["annotations"].update(body["metadata"]["annotations"])
                    return self._json(200, fake.pod)

            def _json(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def cost(self) -> str | None:
        with self.lock:
            return self.pod["metadata"]["annotations"].get(ANNOTATION)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakePodApi()
    yield f
    f.stop()


class Sessions:
    def __init__(self, n: int = 0) -> None:
        self.n = n

    def __call__(self) -> int:
        return self.n


def updater(fake: FakePodApi, sessions: Callable[[], int], interval_s: float = 10.0, **kw) -> DeletionCost:
    return DeletionCost(sessions, POD, NAMESPACE, interval_s,
                        api_client=client.ApiClient(client.Configuration(host=fake.host)), **kw)


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_annotation_follows_the_session_count_and_keeps_other_annotations(fake):
    sessions = Sessions(3)
    u = updater(fake, sessions)
    assert u.update() is True
    assert fake.cost == "3"
    path, ctype, body = fake.patches[-1]
    assert path == f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}"
    assert ctype in MERGE_TYPES
    assert body == {"metadata": {"annotations": {ANNOTATION: "3"}}}  # only the annotation, nothing else
    sessions.n = 0
    assert u.update() is True and fake.cost == "0"
    sessions.n = 17
    assert u.update() is True and fake.cost == "17"
    assert fake.pod["metadata"]["annotations"]["keep"] == "me"


def test_no_patch_when_the_count_is_unchanged(fake):
    sessions = Sessions(5)
    u = updater(fake, sessions)
    assert u.update() is True
    for _ in range(5):
        assert u.update() is False
    assert len(fake.patches) == 1 and fake.requests == 1
    sessions.n = 6
    assert u.update() is True and len(fake.patches) == 2


def test_an_api_error_is_logged_backed_off_and_retried_without_stopping(fake, caplog):
    sessions = Sessions(4)
    u = updater(fake, sessions, interval_s=1.0, max_backoff_s=8.0)
    fake.fail_next, fake.fail_code = 3, 403  # e.g. the Role is missing
    with caplog.at_level("DEBUG", logger="eftmesh.logit.deletion_cost"):
        waits = []
        for _ in range(3):
            u.run_once()  # never raises
            waits.append(u.next_wait())
        assert waits == [2.0, 4.0, 8.0] and fake.cost is None
        assert u.written is None  # nothing written yet, so the next round tries again
        u.run_once()
    assert fake.cost == "4" and u.failures == 0 and u.next_wait() == 1.0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "403" in warnings[0].getMessage()  # one warning per run of failures
    assert any("set again after 3 failures" in r.getMessage() for r in caplog.records)


def test_the_thread_keeps_updating_through_errors_and_patches_only_changes(fake):
    sessions = Sessions(2)
    u = updater(fake, sessions, interval_s=0.02, max_backoff_s=0.05).start()
    try:
        wait_for(lambda: fake.cost == "2")
        time.sleep(0.2)
        assert len(fake.patches) == 1  # unchanged: no more PATCHes
        fake.fail_next, fake.fail_code = 2, 500
        sessions.n = 9
        wait_for(lambda: fake.cost == "9")  # the errors did not stop it
        assert len(fake.patches) == 2 and fake.requests == 4
        sessions.n = 1
        wait_for(lambda: fake.cost == "1")
    finally:
        u.stop()
    assert not u._thread.is_alive()


def test_an_unreachable_api_does_not_stop_the_thread():
    u = DeletionCost(lambda: 1, POD, NAMESPACE, 0.02, max_backoff_s=0.05,
                     api_client=client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    u.start()
    try:
        wait_for(lambda: u.failures >= 2)
        assert u._thread.is_alive()
    finally:
        u.stop()


def test_it_is_off_by_default_outside_kubernetes_and_on_every_ten_seconds_inside():
    base = ["--model=/m", "--role=r"]
    assert parse_args(base, environ={}).deletion_cost_interval_s == 0
    assert parse_args(base, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).deletion_cost_interval_s == 10
    assert parse_args(base + ["--deletion-cost-interval=0"],
                      environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).deletion_cost_interval_s == 0
    assert parse_args(base + ["--deletion-cost-interval=2.5"], environ={}).deletion_cost_interval_s == 2.5
    with pytest.raises(SystemExit):
        parse_args(base + ["--deletion-cost-interval=-1"], environ={})


def test_without_pod_identity_or_in_cluster_config_it_stays_off_and_says_why(caplog):
    assert deletion_cost.start_from_env(lambda: 0, 0, environ={"POD_NAME": "p", "POD_NAMESPACE": "n"}) is None
    with caplog.at_level("WARNING", logger="eftmesh.logit.deletion_cost"):
        assert deletion_cost.start_from_env(lambda: 0, 10, environ={"POD_NAMESPACE": "n"}) is None
        # a pod name but no KUBERNETES_SERVICE_HOST / token: no in-cluster config
        assert deletion_cost.start_from_env(lambda: 0, 10, environ={"POD_NAME": "p", "POD_NAMESPACE": "n"}) is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("POD_NAME" in m for m in messages) and any("cannot reach the Kubernetes API" in m for m in messages)


@pytest.mark.e2e
def test_a_logit_server_started_with_the_flag_keeps_its_pod_annotation(fake, tiny_family, monkeypatch):
    """The real service: the annotation follows the sessions a Score opens and a Release ends."""
    import grpc

    from conftest import start_logit
    from eftmesh.v1 import logit_pb2, logit_pb2_grpc

    monkeypatch.setenv("POD_NAME", POD)
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    monkeypatch.setattr(deletion_cost, "in_cluster_api_client",
                        lambda: client.ApiClient(client.Configuration(host=fake.host)))
    ls = start_logit(tiny_family["base-small"], "base-small", deletion_cost_interval_s=0.05)
    try:
        wait_for(lambda: fake.cost == "0")
        with grpc.insecure_channel(f"127.0.0.1:{ls.server.port}") as ch:
            stub = logit_pb2_grpc.LogitServiceStub(ch)
            for sid in ("a", "b"):
                stub.Score(logit_pb2.ScoreRequest(session_id=sid, start=0, tokens=[1, 2, 3], rows=1))
            wait_for(lambda: fake.cost == "2")
            stub.Release(logit_pb2.ReleaseRequest(session_id="a"))
            wait_for(lambda: fake.cost == "1")
        written = [p[2]["metadata"]["annotations"][ANNOTATION] for p in fake.patches]
        assert written[0] == "0" and "2" in written and written[-1] == "1"
        assert all(a != b for a, b in zip(written, written[1:]))  # a PATCH only for a change
    finally:
        ls.server.stop(0).wait()
        ls.deletion_cost_updater.stop()
