"""The combiner's answers to a caller's mistakes: the right status, a message that says what to
fix, and a service that still answers afterwards. Also its refusals: to start over models with
another tokenizer, and to take more generations than its limit."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from conftest import start_combiner, start_logit
from eftmesh.common.errors import FailedPrecondition
from eftmesh.common.serving import ServerConfig
from eftmesh.tiny import make_model, make_tokenizer
from eftmesh.logit.engine import ModelEngine
from eftmesh.logit.server import LogitConfig, LogitServer
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e

ROLES = ("base-large", "base-small", "ft-small")
CONTEXT = 128  # n_positions of eftmesh.tiny's models
CAP = 64  # max_new_tokens_cap of the `mesh` fixture's combiner


def request(cls, **fields):
    """A request that is good except for what `fields` overrides."""
    base = dict(prompt="The quick brown fox", max_new_tokens=2, seed=1, sampling=tensor_pb2.SamplingParams(temperature=0.0))
    base.update(fields)
    return cls(**base)


def call_generate(stub: generator_pb2_grpc.GeneratorStub, **fields) -> list[generator_pb2.GenerateResponse]:
    return list(stub.Generate(request(generator_pb2.GenerateRequest, **fields), timeout=30))


def call_complete(stub: generator_pb2_grpc.GeneratorStub, **fields) -> generator_pb2.CompleteResponse:
    return stub.Complete(request(generator_pb2.CompleteRequest, **fields), timeout=30)


CALLS = {"Generate": call_generate, "Complete": call_complete}


def assert_still_answers(stub: generator_pb2_grpc.GeneratorStub) -> None:
    resp = call_complete(stub)
    assert resp.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
    assert 1 <= len(resp.token_ids) <= 2
    chunks = call_generate(stub)
    assert chunks[-1].finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED


def delta(tuned="ft-small", reference="base-small", weight=1.0) -> generator_pb2.Delta:
    return generator_pb2.Delta(tuned=tuned, reference=reference, weight=weight)


def composition(base="base-large", deltas=(delta(),)) -> generator_pb2.Composition:
    return generator_pb2.Composition(base=base, deltas=list(deltas))


def sampling(**fields) -> tensor_pb2.SamplingParams:
    return tensor_pb2.SamplingParams(**fields)


# (case id, request fields, status, fragments the message must contain)
BAD_REQUESTS = [
    ("empty prompt", dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, ["prompt", "empty"]),
    (
        "prompt longer than the context",
        dict(prompt="The quick brown fox jumps over the lazy dog. " * 20),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["prompt", str(CONTEXT), "shorten"],
    ),
    ("max_new_tokens 0", dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, ["max_new_tokens", ">= 1", "got 0"]),
    ("max_new_tokens over the cap", dict(max_new_tokens=CAP + 1), grpc.StatusCode.INVALID_ARGUMENT, ["max_new_tokens", f"[1, {CAP}]", f"got {CAP + 1}"]),
    ("negative temperature", dict(sampling=sampling(temperature=-0.5)), grpc.StatusCode.INVALID_ARGUMENT, ["temperature", ">= 0", "-0.5"]),
    ("NaN temperature", dict(sampling=sampling(temperature=math.nan)), grpc.StatusCode.INVALID_ARGUMENT, ["temperature", ">= 0"]),
    ("top_p 0", dict(sampling=sampling(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, ["top_p", "(0, 1]"]),
    ("top_p over 1", dict(sampling=sampling(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, ["top_p", "(0, 1]", "1.5"]),
    ("negative top_k", dict(sampling=sampling(top_k=-1)), grpc.StatusCode.INVALID_ARGUMENT, ["top_k", ">= 0", "-1"]),
    ("unknown base role", dict(composition=composition(base="base-huge")), grpc.StatusCode.NOT_FOUND, ["'base-huge'", *ROLES]),
    (
        "unknown delta role",
        dict(composition=composition(deltas=[delta(tuned="ft-huge")])),
        grpc.StatusCode.NOT_FOUND,
        ["'ft-huge'", *ROLES],
    ),
    ("NaN weight", dict(composition=composition(deltas=[delta(weight=math.nan)])), grpc.StatusCode.INVALID_ARGUMENT, ["deltas[0].weight", "finite"]),
    ("infinite weight", dict(composition=composition(deltas=[delta(weight=math.inf)])), grpc.StatusCode.INVALID_ARGUMENT, ["deltas[0].weight", "finite"]),
    (
        "negative infinite weight in a second delta",
        dict(composition=composition(deltas=[delta(), delta(weight=-math.inf)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["deltas[1].weight", "finite"],
    ),
    ("deltas but no base", dict(composition=composition(base="")), grpc.StatusCode.INVALID_ARGUMENT, ["base", "empty"]),
    (
        "delta without a reference",
        dict(composition=composition(deltas=[delta(reference="")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["deltas[0]", "reference"],
    ),
]


@pytest.mark.parametrize("rpc", list(CALLS))
@pytest.mark.parametrize("fields,code,fragments", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_a_message_that_says_what_to_fix(mesh, rpc, fields, code, fragments):
    stub = mesh.generator
    with pytest.raises(grpc.RpcError) as e:
        CALLS[rpc](stub, **fields)
    assert e.value.code() == code, e.value.details()
    for fragment in fragments:
        assert fragment in e.value.details()
    assert "internal" not in e.value.details().lower()
    assert_still_answers(stub)


def test_a_prompt_that_just_fits_the_context_is_accepted(mesh, tiny_family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    ids = tok.encode(prompt)[: CONTEXT - 1]
    prompt = tok.decode(ids)
    assert len(tok.encode(prompt)) == CONTEXT - 1
    resp = call_complete(mesh.generator, prompt=prompt, max_new_tokens=CAP)
    assert resp.finish_reason == generator_pb2.FINISH_REASON_CONTEXT
    assert len(resp.token_ids) == 1


# --- Refusal to start -------------------------------------------------------------------------


def test_combiner_refuses_to_start_over_a_model_with_another_tokenizer(mesh, tiny_family, tmp_path):
    make_tokenizer(tmp_path / "other-tokenizer", vocab_size=300)
    odd_dir = tmp_path / "odd-model"
    make_model(odd_dir, tmp_path / "other-tokenizer", layers=1, width=32, heads=2, seed=7)
    odd = start_logit(odd_dir, "odd-one")
    try:
        ports = {"base-small": mesh.logits["base-small"].server.port, "odd-one": odd.server.port}
        with pytest.raises(FailedPrecondition) as e:
            start_combiner(tiny_family["base-small"], ports)
        msg = str(e.value)
        assert "odd-one" in msg
        assert str(odd_dir) in msg
        assert "base-small" not in msg  # only the model that differs is named
        assert "tokenizer" in msg
    finally:
        odd.server.stop(0).wait()


# --- Overload ---------------------------------------------------------------------------------


class GatedEngine(ModelEngine):
    """A real engine that lets one Score through, then holds each next one until the test opens
    the gate: a generation that stays in flight for as long as the test needs."""

    def score(self, *args, **kwargs):
        if not self.opened.is_set():
            assert self.tickets.acquire(timeout=30), "the test never opened the gate"
        return super().score(*args, **kwargs)

    def open(self) -> None:
        self.opened.set()
        self.tickets.release()


@pytest.fixture
def gated_logit(tiny_family: dict[str, Path]) -> Iterator[tuple[LogitServer, GatedEngine]]:
    path = tiny_family["base-small"]
    engine = GatedEngine.from_pretrained(str(path), role="base-small")
    engine.tickets, engine.opened = threading.Semaphore(1), threading.Event()
    ls = build_logit(LogitConfig(model=str(path), role="base-small", server=ServerConfig(host="127.0.0.1", port=0, grace_s=1.0)), engine=engine)
    ls.start()
    yield ls, engine
    engine.open()
    ls.server.stop(0).wait()


def timed(fn: Callable[[], object]) -> tuple[grpc.RpcError, float]:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value, time.monotonic() - t0


def test_a_generation_over_the_limit_is_refused_at_once_with_resource_exhausted(tiny_family, gated_logit):
    ls, engine = gated_logit
    cs = start_combiner(tiny_family["base-small"], {"base-small": ls.server.port}, max_concurrent_generations=1)
    ch = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    try:
        stub = generator_pb2_grpc.GeneratorStub(ch)
        plain = composition(base="base-small", deltas=())
        long = stub.Generate(request(generator_pb2.GenerateRequest, composition=plain, max_new_tokens=8), timeout=60)
        first = next(long)  # the first step ran; the second waits at the gate, holding the slot
        assert first.finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED

        for call in (
            lambda: call_complete(stub, composition=plain),
            lambda: call_generate(stub, composition=plain),
        ):
            err, elapsed = timed(call)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "retry" in err.details()
            assert elapsed < 5.0  # refused, not queued behind the held generation

        engine.open()
        rest = list(long)  # the held generation finishes normally ...
        assert rest[-1].finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
        # ... and its slot is free again
        assert call_complete(stub, composition=plain).finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
    finally:
        engine.open()
        ch.close()
        cs.stop(0)


def test_a_cancelled_generation_frees_its_slot_and_its_upstream_session(tiny_family, gated_logit):
    ls, engine = gated_logit
    cs = start_combiner(tiny_family["base-small"], {"base-small": ls.server.port}, max_concurrent_generations=1)
    ch = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    try:
        stub = generator_pb2_grpc.GeneratorStub(ch)
        plain = composition(base="base-small", deltas=())
        long = stub.Generate(request(generator_pb2.GenerateRequest, composition=plain, max_new_tokens=8), timeout=60)
        assert next(long).finish_reason == generator_pb2.FINISH_REASON_UNSPECIFIED
        assert len(engine.sessions) == 1
        long.cancel()
        engine.open()  # the held step returns; the combiner must notice the cancellation
        deadline = time.monotonic() + 10
        while True:
            try:
                resp = call_complete(stub, composition=plain)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert time.monotonic() < deadline, "the cancelled generation kept its slot"
                time.sleep(0.05)
        assert resp.finish_reason != generator_pb2.FINISH_REASON_UNSPECIFIED
        while len(engine.sessions) > 0:  # Release is sent without waiting: give it a moment
            assert time.monotonic() < deadline, "the cancelled generation kept its upstream session"
            time.sleep(0.05)
    finally:
        engine.open()
        ch.close()
        cs.stop(0)
