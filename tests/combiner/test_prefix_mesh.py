"""Prefix caching through the whole mesh (three logit services and a combiner on loopback): a
second request that re-sends a conversation's history takes it from every role's prefix cache,
and its output, greedy and seeded-sampled, is the output the same request gets with every
cache turned off."""

from __future__ import annotations

import pytest

from conftest import idle, wait_for
from eftmesh.v1 import generator_pb2

pytestmark = pytest.mark.e2e

HISTORY = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
           "must be in want of a wife. However little known the feelings or views of such a man may be")


def complete(mesh, prompt: str, temperature: float) -> generator_pb2.CompleteResponse:
    r = mesh.generator.Complete(generator_pb2.CompleteRequest(
        prompt=prompt, sampling={"temperature": temperature}, seed=7, max_new_tokens=8, ignore_eos=True), timeout=60)
    assert wait_for(idle(mesh.logits), 10.0), "the mesh kept sessions after the reply"
    return r


def hits(mesh) -> dict[str, int]:
    return {role: ls.engine.pool.prefix.hit_tokens for role, ls in mesh.logits.items()}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_resent_history_hits_every_roles_cache_and_gives_the_uncached_output(mesh, temperature):
    first = complete(mesh, f"{temperature} {HISTORY}", temperature)
    second_prompt = f"{temperature} {HISTORY}{first.text} and"
    before = hits(mesh)
    cached = complete(mesh, second_prompt, temperature)
    after = hits(mesh)
    assert all(after[r] > before[r] for r in after), (before, after)
    # what every role's cache held of the prompt, in the request's usage (the least over the roles)
    assert 0 < cached.usage.cached_prompt_tokens <= min(after[r] - before[r] for r in after)
    assert first.usage.cached_prompt_tokens == 0
    for ls in mesh.logits.values():
        ls.engine.pool.set_prefix_cache(False)
    try:
        plain = complete(mesh, second_prompt, temperature)
    finally:
        for ls in mesh.logits.values():
            ls.engine.pool.set_prefix_cache(True)
    assert list(cached.token_ids) == list(plain.token_ids)
    assert cached.text == plain.text and plain.usage.cached_prompt_tokens == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_chunked_prompt_through_the_mesh_gives_the_unchunked_output_and_its_cached_prefix(mesh, tiny_family,
                                                                                            temperature):
    """--prefill-chunk 16 on a combiner of its own over the same logit services: the prompt
    goes in pieces of 16 tokens (rows 0 on the wire: they only fill the caches), and the output
    is what the shared combiner (chunks of 2048: one piece) gives; re-sent, every piece takes
    its blocks from the prefix caches."""
    from conftest import start_combiner
    from eftmesh.combiner.scheduler import SchedulerConfig

    prompt = f"chunked {temperature} {HISTORY}"
    want = complete(mesh, prompt, temperature)
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in mesh.logits.items()},
                        scheduler=SchedulerConfig(prefill_chunk=16))
    try:
        import grpc
        from eftmesh.v1 import generator_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{cs.server.port}") as ch:
            stub = generator_pb2_grpc.GeneratorStub(ch)
            tokens_before = {r: ls.engine.pool.prefix.hit_tokens for r, ls in mesh.logits.items()}
            got = stub.Complete(generator_pb2.CompleteRequest(prompt=prompt, sampling={"temperature": temperature},
                                                              seed=7, max_new_tokens=8, ignore_eos=True), timeout=60)
    finally:
        cs.stop(0)
    assert wait_for(idle(mesh.logits), 10.0), "the mesh kept sessions after the reply"
    assert list(got.token_ids) == list(want.token_ids) and got.text == want.text
    assert got.usage.prompt_tokens == want.usage.prompt_tokens > 32
    # the first run cached the prompt's full blocks: every 16-token piece found its block
    assert got.usage.cached_prompt_tokens >= 32, got.usage
    assert all(ls.engine.pool.prefix.hit_tokens - tokens_before[r] >= 32 for r, ls in mesh.logits.items())
