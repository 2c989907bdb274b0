"""Prefix-aware routing over real replicas: two logit services of every role on loopback (the
prefix cache on, as by default) and a combiner over them. Requests that share a long beginning
(a system prompt) land on one replica of each role, where they find it cached; when that
replica goes away they go on, with the same output, on the other."""

from __future__ import annotations

import grpc
import pytest

from conftest import start_combiner, start_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2
from test_replicas import count_sessions

ROLES = ("base-large", "base-small", "ft-small")
# about 80 tokens (the tiny models' context is 128): past the 64 that choose a replica
SYSTEM = ("You are the archivist of a small mountain town. You answer questions about its history, its people "
          "and its weather in two short sentences, politely, without inventing names. ")
QUESTIONS = [f"Year {1900 + 7 * i}?" for i in range(20)]


def complete(address: str, prompt: str) -> generator_pb2.CompleteResponse:
    with grpc.insecure_channel(address) as ch:
        return generator_pb2_grpc.GeneratorStub(ch).Complete(generator_pb2.CompleteRequest(
            prompt=prompt, max_new_tokens=6, ignore_eos=True,
            sampling=tensor_pb2.SamplingParams(temperature=0.0)), timeout=60)


@pytest.mark.e2e
def test_requests_sharing_a_prefix_land_on_one_replica_and_go_on_elsewhere_when_it_goes(tiny_family):
    replicas = {r: [start_logit(tiny_family[r], r) for _ in range(2)] for r in ROLES}
    seen = {r: [count_sessions(ls) for ls in lss] for r, lss in replicas.items()}
    targets = {r: ",".join(f"127.0.0.1:{ls.server.port}" for ls in lss) for r, lss in replicas.items()}
    cs = start_combiner(tiny_family["base-small"], dict.fromkeys(ROLES, 0), upstream_targets=targets)
    try:
        address = f"127.0.0.1:{cs.server.port}"
        assert cs.scorer.wait_live(30)
        # one at a time: the load (one session per role) stays within --prefix-routing-slack
        first = [complete(address, SYSTEM + q) for q in QUESTIONS]
        home = {}
        for r in ROLES:
            counts = [len(s) for s in seen[r]]
            assert max(counts) >= 0.9 * len(QUESTIONS), f"{r}: sessions per replica {counts}"
            home[r] = counts.index(max(counts))
        # found cached there: every request after the first reuses the system prompt's blocks
        assert first[0].usage.cached_prompt_tokens == 0
        assert all(c.usage.cached_prompt_tokens >= 32 for c in first[1:]), [c.usage.cached_prompt_tokens for c in first]
        for r in ROLES:  # the replica holding the prefix goes away, in every role
            replicas[r][home[r]].server.stop(0).wait()
        again = [complete(address, SYSTEM + q) for q in QUESTIONS[:5]]
        assert [c.token_ids for c in again] == [c.token_ids for c in first[:5]]
        for r in ROLES:
            survivor = seen[r][1 - home[r]]
            assert len(survivor) >= len(again), f"{r}: the other replica served {len(survivor)} sessions"
        assert all(c.usage.cached_prompt_tokens >= 32 for c in again[1:])  # and caches it there from then on
    finally:
        cs.stop(0)
        for lss in replicas.values():
            for ls in lss:
                ls.server.stop(0).wait()
