"""What a generation reports of the logit services' prefix caches: each call's cached tokens
(Outcome.cached_tokens, as the in-process scorer passes them on), the least over the roles of
their answers to the prompt's first pass (one call, or one per piece of a chunked prompt) as
Usage.cached_prompt_tokens, and that figure in Generate's usage and in
the OpenAI-style usage.prompt_tokens_details.cached_tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from eftmesh.combiner import convert
from eftmesh.combiner.decoder import Decoder
from eftmesh.combiner.decoding import GenerationRequest
from eftmesh.combiner.openai_schema import usage_json
from eftmesh.combiner.scheduler import SchedulerConfig
from eftmesh.combiner.scoring import ScoreCall
from eftmesh.combiner.server import DEFAULT_COMPOSITION
from eftmesh.combiner.stream import Chunk, FinishReason, Usage
from eftmesh.core.sampling import SamplingConfig
from eftmesh.inprocess import LocalScorer
from eftmesh.logit.engine import ModelEngine


@pytest.fixture(scope="module")
def engines(tiny_family: dict[str, Path]) -> dict[str, ModelEngine]:
    torch.set_num_threads(1)
    return {r: ModelEngine.from_pretrained(str(p), role=r, session_active_s=0.0) for r, p in tiny_family.items()}


def test_the_in_process_scorer_passes_each_calls_cached_tokens_on(engines):
    scorer = LocalScorer(engines)
    tokens = list(range(3, 43))  # 40 tokens: two full blocks of 16 can be shared
    first = scorer.score_batch("base-small", [ScoreCall("base-small", "a", tokens, 0, 1)])[0]
    second = scorer.score_batch("base-small", [ScoreCall("base-small", "b", tokens, 0, 1)])[0]
    assert (first.cached_tokens, second.cached_tokens) == (0, 32)
    scorer.release({"base-small": "a"})
    scorer.release({"base-small": "b"})


def test_cached_prompt_tokens_is_the_least_over_the_roles_of_their_first_pass_answers(engines, tiny_family):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))
    d = Decoder(LocalScorer(engines), tokenizer, len(tokenizer), SchedulerConfig(), start=False)
    try:
        g = d.prepare(GenerationRequest("It is a truth universally acknowledged, that a single man in possession "
                                        "of a good fortune must be in want of a wife.", DEFAULT_COMPOSITION,
                                        SamplingConfig(temperature=0.0), seed=0, max_new_tokens=4))
        usage = g.sink.usage
        g.prefilled("base-large", 0, 32)
        g.prefilled("ft-small", 0, 16)
        assert usage.cached_prompt_tokens == 0  # base-small has not answered yet
        g.prefilled("base-small", 0, 48)
        assert usage.cached_prompt_tokens == 16
        g.prefilled("ft-small", 0, 16)  # the same call again (a step redone after a straggler): once
        g.prefilled("no-such-role", 0, 0)
        assert usage.cached_prompt_tokens == 16
        # a chunked prompt (--prefill-chunk): each piece adds what each role's cache held of it
        for role, n in (("base-large", 16), ("ft-small", 8), ("base-small", 16)):
            g.prefilled(role, 16, n)
        assert usage.prompt_tokens >= 24 and usage.cached_prompt_tokens == 24
        usage.completion_tokens = 1  # a later call (a decode step) changes nothing
        g.prefilled("ft-small", 32, 16)
        assert usage.cached_prompt_tokens == 24
        usage.completion_tokens = 0
        g.restart()  # nor does a re-prefill after a preemption
        g.prefilled("ft-small", 32, 16)
        assert usage.cached_prompt_tokens == 24
    finally:
        d.close()


def test_generate_usage_and_the_openai_usage_carry_the_cached_prompt_tokens():
    usage = Usage(prompt_tokens=40, completion_tokens=3, cached_prompt_tokens=32)
    msg = convert.chunk_to_pb(Chunk(token_ids=[1], finish_reason=FinishReason.LENGTH, usage=usage))
    assert (msg.usage.prompt_tokens, msg.usage.cached_prompt_tokens) == (40, 32)
    assert usage_json(usage) == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
                                 "prompt_tokens_details": {"cached_tokens": 32}}
