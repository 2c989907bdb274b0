"""k8s:/// discovery end to end, against a FAKE Kubernetes API server: a real combiner finds two
real base-large logit services through a Service's EndpointSlices, spreads sessions over them,
and when the watch reports one pod terminating sends no new session there while the generation
already pinned there finishes on it, exactly.

No API server can run here: `FakeKubeApiServer` (from test_discovery.py) speaks the
EndpointSlice list/watch protocol over loopback, and the combiner reaches it through a
kubeconfig named by $KUBECONFIG, as it would outside a cluster."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import start_combiner, start_logit
from eftmesh.combiner.discovery import READY, TERMINATING
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2
from test_discovery import NS, FakeKubeApiServer, endpoint, endpoint_slice

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SERVICE = "eft-base-large"
TARGET = f"k8s:///{SERVICE}.{NS}:grpc"  # the port by its name in the slices
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "It was a dark night"]
LONG_PROMPT = "A long story begins here"


def greedy(max_new_tokens: int = 12) -> dict:
    return {"max_new_tokens": max_new_tokens, "ignore_eos": True, "sampling": tensor_pb2.SamplingParams(temperature=0.0)}


def complete(stub: generator_pb2_grpc.GeneratorStub, prompt: str) -> str:
    return stub.Complete(generator_pb2.CompleteRequest(prompt=prompt, **greedy()), timeout=60).text


def generate(stub: generator_pb2_grpc.GeneratorStub, prompt: str) -> tuple[list[int], str]:
    ids, text = [], []
    for r in stub.Generate(generator_pb2.GenerateRequest(prompt=prompt, **greedy(64)), timeout=60):
        ids += r.token_ids
        text.append(r.text)
    return ids, "".join(text)


def wait_for(pred, timeout: float, what: str) -> float:
    """Poll pred() every 10 ms until it holds; seconds taken."""
    started = time.monotonic()
    while not pred():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


class Gate:
    """Holds the first session that reaches its third batched call on either replica (once
    armed), until released: a generation pinned to a replica and in progress there."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.armed = False
        self.session: str | None = None
        self.replica: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def check(self, index: int, items, seen: dict[str, int]) -> None:
        with self.lock:
            if not self.armed:
                return
            sids = {it.session_id for it in items}
            if self.session is None:
                ripe = [s for s in sids if seen[s] >= 3]
                if not ripe:
                    return
                self.session, self.replica = ripe[0], index
            if self.session not in sids:
                return
        self.held.set()
        self.release.wait(15.0)


def record(ls, index: int, gate: Gate) -> dict[str, int]:
    """Wrap a logit service's engine: count each session id's batched calls; let `gate` hold one."""
    seen: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    for name in ("score_batch", "draft_batch"):
        original = getattr(ls.engine, name)

        def wrapped(items, *args, _original=original, **kwargs):
            with lock:
                for it in items:
                    seen[it.session_id] += 1
            gate.check(index, items, seen)
            return _original(items, *args, **kwargs)

        setattr(ls.engine, name, wrapped)
    return seen


def pod(port: int, index: int, **conditions) -> dict:
    return endpoint_slice(f"{SERVICE}-{'ab'[index] * 5}",
                          [endpoint("127.0.0.1", f"{SERVICE}-7d4b9-pod{index:02d}", **conditions)],
                          service=SERVICE, port=port)


@pytest.fixture
def fake_api(tmp_path, monkeypatch):
    """The FAKE API server, and a kubeconfig pointing at it named by $KUBECONFIG."""
    fake = FakeKubeApiServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.host}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nobody", "namespace": NS}}],
        "users": [{"name": "nobody", "user": {}}],
    }))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the kubeconfig
    # discovery.kube_api_client reads $KUBECONFIG when it is called (the kubernetes client
    # itself reads it once, at its first import, which an earlier test may have done).
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield fake
    fake.stop()


def test_fake_api_server_terminating_pod_gets_no_new_sessions_and_its_pinned_one_finishes(
        mesh, tiny_family, fake_api):
    fake = fake_api
    expected = {p: complete(mesh.generator, p) for p in PROMPTS}
    expected_long = generate(mesh.generator, LONG_PROMPT)
    assert len(expected_long[0]) == 64

    large = [start_logit(tiny_family["base-large"], "base-large") for _ in range(2)]
    gate = Gate()
    seen = [record(ls, i, gate) for i, ls in enumerate(large)]
    ports = [ls.server.port for ls in large]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    for i, p in enumerate(ports):
        fake.apply(pod(p, i))
    others = {r: mesh.logits[r].server.port for r in ("base-small", "ft-small")}
    cs = start_combiner(tiny_family["base-small"], {"base-large": 0, **others},
                        upstream_targets={"base-large": TARGET},
                        policy=UpstreamPolicy(prefix_slack=None))  # least loaded: the spread is the point
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    stub = generator_pb2_grpc.GeneratorStub(channel)
    pool = ThreadPoolExecutor(5)
    try:
        rs = cs.scorer.replicas["base-large"]
        assert rs.watcher is not None and rs.watcher.endpoints() == dict.fromkeys(addresses, READY)
        wait_for(lambda: sorted(r.address for r in rs.replicas() if r.verified) == sorted(addresses)
                 and all(r.verified for role in others for r in cs.scorer.replicas[role].replicas()),
                 10.0, "both base-large replicas found and verified")

        # (1) sessions spread over both replicas; (3) the same greedy text as the shared mesh
        got = dict(zip(PROMPTS, pool.map(lambda p: complete(stub, p), PROMPTS)))
        assert got == expected
        assert all(len(s) >= 1 for s in seen), [dict(s) for s in seen]
        assert not set(seen[0]) & set(seen[1])  # no session touched both replicas
        before = [set(s) for s in seen]

        # (2) a long generation pinned on one replica (held there mid-generation) ...
        gate.armed = True
        long = pool.submit(generate, stub, LONG_PROMPT)
        assert gate.held.wait(10.0), "the long generation never reached its third step"
        a, b = gate.replica, 1 - gate.replica
        replica_a = next(r for r in rs.replicas() if r.address == addresses[a])
        assert rs.load()[addresses[a]] == 1
        steps_before = seen[a][gate.session]

        # ... then the watch says A's pod is terminating (still serving its connections)
        fake.apply(pod(ports[a], a, ready=False, serving=True, terminating=True))
        took = wait_for(lambda: replica_a.draining, 3.0, "the combiner to see A terminating")
        assert took < 1.0, f"the MODIFIED event took {took:.2f} s to reach the combiner"
        assert replica_a.membership == TERMINATING and rs.load()[addresses[a]] == 1  # its session stays
        gate.release.set()

        got = dict(zip(PROMPTS, pool.map(lambda p: complete(stub, p), PROMPTS)))
        assert got == expected
        new = [set(s) - before[i] for i, s in enumerate(seen)]
        assert new[a] == {gate.session}, "a new session went to the terminating replica"
        assert len(new[b]) == len(PROMPTS) and gate.session not in new[b]

        assert long.result(timeout=30) == expected_long  # finished on A, exactly
        assert gate.session not in seen[b]
        assert seen[a][gate.session] - steps_before >= 50  # the rest of its steps ran on A
        wait_for(lambda: rs.load().get(addresses[a], 0) == 0, 5.0, "A's last session released")
        rs.refresh()  # (the combiner's next resolve round would do it): drained and empty, closed
        assert sorted(rs.load()) == [addresses[b]]
    finally:
        gate.release.set()
        pool.shutdown(wait=True, cancel_futures=True)
        channel.close()
        cs.stop(0)
        for ls in large:
            ls.server.stop(0).wait()
