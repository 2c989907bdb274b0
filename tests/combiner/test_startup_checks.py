"""Start-up checks: a logit service's smaller --max-k caps the combiner's largest block
(with a warning, reported by Info) instead of failing clients' requests upstream; a tokenizer
refusal says what differs; Info can hide the model path."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from conftest import start_combiner, start_logit
from eftmesh.combiner.scoring import ModelSpec
from eftmesh.combiner.server import parse_args as combiner_args
from eftmesh.combiner.scoring import check_compatible
from eftmesh.common.errors import FailedPrecondition
from eftmesh.logit.server import LogitServer
from eftmesh.logit.server import parse_args as logit_args
from eftmesh.v1 import generator_pb2, generator_pb2_grpc, logit_pb2, logit_pb2_grpc, tensor_pb2

GREEDY = tensor_pb2.SamplingParams(temperature=0.0)
UPSCALE = generator_pb2.Composition(
    base="base-large", deltas=[generator_pb2.Delta(tuned="ft-small", reference="base-small", weight=1.0)])


@pytest.fixture(scope="module")
def logits(tiny_family: dict[str, Path]) -> Iterator[dict[str, LogitServer]]:
    """The three roles; ft-small drafts at most 2 tokens per call and hides its model path."""
    started = {
        "base-large": start_logit(tiny_family["base-large"], "base-large"),
        "base-small": start_logit(tiny_family["base-small"], "base-small"),
        "ft-small": start_logit(tiny_family["ft-small"], "ft-small", max_k=2, expose_model_id=False),
    }
    yield started
    for ls in started.values():
        ls.server.stop(0).wait()


def ports(logits: dict[str, LogitServer]) -> dict[str, int]:
    return {r: ls.server.port for r, ls in logits.items()}


@pytest.mark.e2e
def test_a_smaller_max_k_caps_the_block_and_requests_succeed(tiny_family, logits, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="eftmesh.combiner"):
        cs = start_combiner(tiny_family["base-small"], ports(logits))  # --max-k 16, adaptive
    ch = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    stub = generator_pb2_grpc.GeneratorStub(ch)
    try:
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "--max-k 16" in said and "capped to 2" in said and "ft-small (2)" in said
        info = stub.Info(generator_pb2.GeneratorInfoRequest())
        assert info.default_speculation.max_k == 2 and info.default_speculation.k == 2
        assert info.default_speculation.mode == generator_pb2.SPECULATION_MODE_ADAPTIVE
        for spec in (generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_ADAPTIVE),
                     generator_pb2.Speculation(),  # the default: adaptive up to the cap
                     generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_FIXED, k=2)):
            got = stub.Complete(generator_pb2.CompleteRequest(
                prompt="the cat", composition=UPSCALE, sampling=GREEDY, max_new_tokens=12, ignore_eos=True,
                speculation=spec), timeout=60)
            assert len(got.token_ids) == 12
            assert got.speculation.drafted_tokens > 0
        # Above the cap: the combiner's own limit, said by the combiner, not the upstream's.
        with pytest.raises(grpc.RpcError) as e:
            stub.Complete(generator_pb2.CompleteRequest(
                prompt="the cat", composition=UPSCALE, sampling=GREEDY, max_new_tokens=4,
                speculation=generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_FIXED, k=8)),
                timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[1, 2]" in e.value.details() and "upstream" not in e.value.details()
    finally:
        ch.close()
        cs.stop(0)


@pytest.mark.e2e
def test_no_cap_when_every_max_k_is_large_enough(tiny_family, logits) -> None:
    big = {r: ls for r, ls in logits.items() if r != "ft-small"}
    ft = start_logit(tiny_family["ft-small"], "ft-small", max_k=32)
    cs = start_combiner(tiny_family["base-small"], ports(big) | {"ft-small": ft.server.port})
    try:
        assert cs.servicer is not None and cs.servicer.effective_defaults().speculation.max_k == 16
    finally:
        cs.stop(0)
        ft.server.stop(0).wait()


@pytest.mark.e2e
def test_info_can_hide_the_model_path(tiny_family, logits) -> None:
    def model_id(role: str) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{logits[role].server.port}") as ch:
            return logit_pb2_grpc.LogitServiceStub(ch).Info(logit_pb2.LogitServiceInfoRequest()).model_id

    assert model_id("ft-small") == "ft-small"
    assert model_id("base-small") == str(tiny_family["base-small"])


def test_flags() -> None:
    a = logit_args(["--model", "m", "--role", "r"])
    assert a.reflection and a.expose_model_id
    a = logit_args(["--model", "m", "--role", "r", "--no-reflection", "--hide-model-path"])
    assert not a.reflection and not a.expose_model_id
    assert combiner_args(["--upstream", "base-large=h:1", "--upstream", "base-small=h:2", "--upstream", "ft-small=h:3",
                          "--tokenizer", "t"]).reflection
    assert not combiner_args(["--upstream", "base-large=h:1", "--no-default-delta", "--tokenizer", "t",
                              "--no-reflection"]).reflection


def spec(role: str, fp: str = "fp-a", tokens: int = 384, eos: int = 0, rows: int = 384) -> ModelSpec:
    return ModelSpec(role, "h:1", f"model-{role}", rows, tokens, fp, 128, "float32", "cpu", eos)


def test_a_tokenizer_refusal_says_what_differs() -> None:
    check_compatible({"a": spec("a"), "b": spec("b")}, "fp-a", 384, 0)
    with pytest.raises(FailedPrecondition) as e:
        check_compatible({"a": spec("a"), "b": spec("b", "fp-b", tokens=400), "c": spec("c", "fp-c", eos=7),
                          "d": spec("d", "fp-d")}, "fp-a", 384, 0, "--tokenizer /tok")
    said = str(e.value)
    assert "/tok" in said and "fp-a" in said and "model-a" not in said
    assert "b (model-b): tokenizer fp-b, 400 tokens vs 384" in said
    assert "c (model-c): tokenizer fp-c, EOS id 7 vs 0" in said
    assert "d (model-d): tokenizer fp-d, same size and EOS id" in said and "token-to-id map" in said
    with pytest.raises(FailedPrecondition, match="narrower: a .model-a.: 300 rows"):
        check_compatible({"a": spec("a", rows=300)}, "fp-a", 384, 0)


@pytest.mark.e2e
def test_a_combiner_with_another_eos_refuses_and_says_so(tiny_family, logits, tmp_path) -> None:
    tok = tmp_path / "tok"
    shutil.copytree(tiny_family["base-small"], tok, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["eos_token"] = AutoTokenizer.from_pretrained(str(tok)).convert_ids_to_tokens(100)
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FailedPrecondition) as e:
        start_combiner(tok, ports(logits))
    said = str(e.value)
    assert "EOS id 0 vs 100" in said and "base-large (" in said and "the combiner's --tokenizer" in said


@pytest.mark.e2e
def test_a_combiner_loading_the_tokenizer_as_another_class_is_not_refused(tiny_family, logits, tmp_path) -> None:
    """The issue's case: byte-identical tokenizer files loaded as another class with a pad token."""
    tok = tmp_path / "tok"
    shutil.copytree(tiny_family["base-small"], tok, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["pad_token"] = cfg["eos_token"]
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    cs = start_combiner(tok, ports(logits))
    cs.stop(0)
