"""The mesh end to end against transformers run directly in this process.

(a) EFT log-probs equal an in-process computation from the same three models (1e-4);
(b) greedy generation equals an in-process greedy EFT loop token for token;
(c) seeded sampling is reproducible;
(d) a base-only composition equals that model's own greedy `generate`.
Plus: streaming equals Complete, and losing a logit replica mid-generation costs a
re-prefill, not the request.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import start_combiner, start_logit
from eftmesh.combiner.policy import UpstreamPolicy
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
UPSCALE = generator_pb2.Composition(
    base="base-large", deltas=[generator_pb2.Delta(tuned="ft-small", reference="base-small", weight=1.0)]
)


@pytest.fixture(scope="module")
def reference(tiny_family):
    """The three models and the tokenizer, loaded with transformers in this process."""
    models = {r: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval() for r, p in tiny_family.items()}
    tok = AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))
    return models, tok


def eft_logprobs(models, ids: list[int], coef: dict[str, float], vocab: int) -> torch.Tensor:
    """log p over the vocabulary for the next token, by full forward passes (no cache)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        acc = sum(c * torch.log_softmax(models[r](x).logits[0, -1, :vocab], -1) for r, c in coef.items())
    return torch.log_softmax(acc, -1)


def greedy_eft(models, ids: list[int], coef: dict[str, float], vocab: int, n: int) -> tuple[list[int], list[float]]:
    ids, out, lps = list(ids), [], []
    for _ in range(n):
        lp = eft_logprobs(models, ids, coef, vocab)
        t = int(torch.argmax(lp))
        out.append(t)
        lps.append(float(lp[t]))
        ids.append(t)
    return out, lps


UPSCALE_COEF = {"base-large": 1.0, "ft-small": 1.0, "base-small": -1.0}


def test_greedy_upscaling_equals_in_process_eft_token_for_token(mesh, reference):
    models, tok = reference
    resp = mesh.generator.Complete(
        generator_pb2.CompleteRequest(prompt=PROMPT, composition=UPSCALE, sampling={"temperature": 0.0}, max_new_tokens=24, logprobs=True)
    )
    expected, expected_lp = greedy_eft(models, tok.encode(PROMPT), UPSCALE_COEF, len(tok), 24)
    assert list(resp.token_ids)[: len(expected)] == expected[: len(resp.token_ids)]
    assert len(resp.token_ids) == 24 or resp.finish_reason == generator_pb2.FINISH_REASON_EOS
    diff = max(abs(a - b) for a, b in zip(resp.logprobs, expected_lp))
    assert diff <= 1e-4, f"max abs log-prob difference {diff}"


@pytest.mark.parametrize(
    "composition,coef",
    [
        (UPSCALE, UPSCALE_COEF),
        # amplified scale delta: ft-small + 1.5 * (base-large - base-small)
        (
            generator_pb2.Composition(base="ft-small", deltas=[generator_pb2.Delta(tuned="base-large", reference="base-small", weight=1.5)]),
            {"ft-small": 1.0, "base-large": 1.5, "base-small": -1.5},
        ),
    ],
    ids=["upscale", "amplified"],
)
def test_sampled_tokens_carry_the_in_process_eft_logprobs(mesh, reference, composition, coef):
    models, tok = reference
    resp = mesh.generator.Complete(
        generator_pb2.CompleteRequest(prompt=PROMPT, composition=composition, sampling={"temperature": 1.0, "top_p": 1.0}, seed=3, max_new_tokens=16, logprobs=True)
    )
    ids = tok.encode(PROMPT)
    diffs = []
    for t, lp in zip(resp.token_ids, resp.logprobs):
        full = eft_logprobs(models, ids, coef, len(tok))
        diffs.append(abs(float(full[t]) - lp))
        ids.append(t)
    assert len(diffs) == len(resp.token_ids) > 0
    assert max(diffs) <= 1e-4, f"max abs log-prob difference {max(diffs)}"


def test_seeded_sampling_is_reproducible(mesh):
    def run(seed: int) -> list[int]:
        r = mesh.generator.Complete(generator_pb2.CompleteRequest(prompt=PROMPT, sampling={"temperature": 1.0}, seed=seed, max_new_tokens=16))
        return list(r.token_ids)

    a, b, c = run(11), run(11), run(12)
    assert a == b
    assert a != c


def test_base_only_composition_equals_transformers_generate(mesh, reference):
    models, tok = reference
    resp = mesh.generator.Complete(
        generator_pb2.CompleteRequest(prompt=PROMPT, composition=generator_pb2.Composition(base="base-large"), sampling={"temperature": 0.0}, max_new_tokens=20)
    )
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        out = models["base-large"].generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    expected = out[0, ids.shape[1] :].tolist()
    assert list(resp.token_ids) == expected


def test_stream_chunks_concatenate_to_the_complete_response(mesh):
    req = dict(prompt=PROMPT, sampling={"temperature": 1.0}, seed=5, max_new_tokens=20, logprobs=True)
    chunks = list(mesh.generator.Generate(generator_pb2.GenerateRequest(**req)))
    full = mesh.generator.Complete(generator_pb2.CompleteRequest(**req))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert all(c.finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == full.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].usage.completion_tokens == len(full.token_ids)
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 0


def test_losing_a_logit_replica_mid_generation_costs_a_reprefill_not_the_request(tiny_family):
    """Stop ft-small after a few tokens, bring up a fresh replica on the same port: the
    stream goes on (UNAVAILABLE is retried, the new replica's NOT_FOUND re-prefilled) and
    the output equals an undisturbed run."""
    logits = {r: start_logit(p, r) for r, p in tiny_family.items()}
    ports = {r: ls.server.port for r, ls in logits.items()}
    # The default rejoin window (1.5 s) is for a restart that is quick in production terms;
    # here the replacement loads its model on a shared CI machine, which took longer than that
    # once (CI, stop 31), and gRPC's reconnect backoff (up to 2 s) can add to it. What the test
    # shows is the re-prefill, not the window's length: give the restart 20 s.
    cs = start_combiner(tiny_family["base-small"], ports, policy=UpstreamPolicy(rejoin_wait_s=20.0))
    stub = generator_pb2_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{cs.server.port}"))
    req = generator_pb2.GenerateRequest(prompt=PROMPT, sampling={"temperature": 0.0}, max_new_tokens=30)
    try:
        undisturbed = [t for c in stub.Generate(req) for t in c.token_ids]
        stream = stub.Generate(req, timeout=60)
        got = list(next(stream).token_ids) + list(next(stream).token_ids)
        logits["ft-small"].server.stop(0).wait()
        restarted = threading.Event()

        def restart() -> None:
            logits["ft-small"] = start_logit(tiny_family["ft-small"], "ft-small", port=ports["ft-small"])
            restarted.set()

        t = threading.Timer(0.3, restart)
        t.start()
        for c in stream:
            got.extend(c.token_ids)
        t.join()
        assert restarted.is_set()
        assert got == undisturbed
    finally:
        cs.stop(0)
        for ls in logits.values():
            ls.server.stop(0).wait()


def test_bfloat16_rows_are_mixed_as_the_wire_brings_them(tiny_family, monkeypatch):
    """Three logit services computing in bfloat16 send bfloat16 rows, and the combiner mixes
    them as they came (`fusedmix.mix3` reads their bits, uint16, and widens them exactly): with one
    model behind every role, EFT up-scaling a + 1.0 * (a - a) is exactly a in float32, so the
    up-scaled generation's tokens and log-probabilities equal base-only's bitwise, plain and
    speculative (k = 4, every draft kept)."""
    from eftmesh.combiner import batchmix
    from eftmesh.core import fusedmix

    model = tiny_family["base-large"]
    logits = {r: start_logit(model, r, dtype="bfloat16") for r in tiny_family}
    cs = start_combiner(tiny_family["base-small"], {r: ls.server.port for r, ls in logits.items()})
    seen = []  # (patched once the combiner has compiled its kernels, `fused.warm`)
    real = fusedmix.mix3
    monkeypatch.setattr(fusedmix, "mix3", lambda *a: seen.append(a[2].dtype) or real(*a))
    monkeypatch.setattr(batchmix, "MIX3_MIN_ENTRIES", 0)  # (the tiny family's rows are few: torch's passes otherwise)
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    stub = generator_pb2_grpc.GeneratorStub(channel)

    def run(composition, speculation=None):
        r = stub.Complete(generator_pb2.CompleteRequest(prompt=PROMPT, composition=composition, sampling={"temperature": 0.0},
                                                        max_new_tokens=16, logprobs=True, speculation=speculation))
        return list(r.token_ids), list(r.logprobs)

    try:
        alone = run(generator_pb2.Composition(base="base-large"))
        assert len(alone[0]) > 0
        upscaled = run(UPSCALE)
        drafted = run(UPSCALE, {"mode": generator_pb2.SPECULATION_MODE_FIXED, "k": 4})
    finally:
        channel.close()
        cs.stop(0)
        for ls in logits.values():
            ls.server.stop(0).wait()
    assert upscaled == alone and drafted == alone
    assert seen and set(seen) == {np.dtype(np.uint16)}
