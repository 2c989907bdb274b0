"""Request lifecycle on the mesh: finished generations release their caches, and the client's
deadline bounds the work."""

from __future__ import annotations

import time

import grpc
import pytest

from eftmesh.v1 import generator_pb2


def _wait_empty(mesh, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        held = {r: len(ls.engine.sessions) for r, ls in mesh.logits.items()}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.05)  # Release is fire-and-forget: it lands a moment after the reply


@pytest.mark.parametrize("mode", [generator_pb2.SPECULATION_MODE_OFF, generator_pb2.SPECULATION_MODE_FIXED])
def test_a_finished_generation_releases_every_upstream_session(mesh, mode):
    mesh.generator.Complete(generator_pb2.CompleteRequest(
        prompt="The quick brown fox", max_new_tokens=8, speculation={"mode": mode, "block_size": 3},
    ))
    assert _wait_empty(mesh) == {r: 0 for r in mesh.logits}


def test_the_client_deadline_bounds_the_generation(mesh):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        mesh.generator.Complete(
            generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=64,
                                          speculation={"mode": generator_pb2.SPECULATION_MODE_OFF}),
            timeout=0.05,
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.0
    assert _wait_empty(mesh) == {r: 0 for r in mesh.logits}
    ok = mesh.generator.Complete(generator_pb2.CompleteRequest(prompt="The quick brown fox", max_new_tokens=2))
    assert len(ok.token_ids) == 2


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_family):
    from transformers import AutoTokenizer

    from eftmesh.combiner.decoding import TokenSink, Usage

    tok = AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))
    sink = TokenSink(tok, None, (), 3, 100, Usage())  # what ignore_eos passes: no EOS id
    assert [sink.add(tok.eos_token_id, None) for _ in range(3)] == [False, False, True]
    assert sink.take().finish_reason.value == "length"
