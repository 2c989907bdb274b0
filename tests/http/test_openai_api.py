"""The OpenAI-compatible HTTP API with the real `openai` client against a real mesh (the shipped
demo family over loopback): chat and completions, streamed and not, give token for token what
gRPC `Complete` gives for the same request, with the same usage; a named composition, an `eft`
extra body and gRPC's `Composition.name` give what the spelled-out gRPC composition gives."""

from __future__ import annotations

from typing import Any

import openai
import pytest

import httpmesh
from httpmesh import ROLES, HttpMesh, request
from eftmesh.v1 import generator_pb2, tensor_pb2

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
demo_logits, http_mesh = httpmesh.demo_logits, httpmesh.http_mesh  # the module's fixtures

D = generator_pb2.Delta
UPSCALE = generator_pb2.Composition(base="base-large", deltas=[D(tuned="ft-small", reference="base-small", weight=1.0)])
AMPLIFIED = generator_pb2.Composition(base="base-large", deltas=[D(tuned="ft-small", reference="base-small", weight=1.5)])
GREEDY = tensor_pb2.SamplingParams(temperature=0.0)
QUESTIONS = ["What pet does Kose Vetael keep?", "Where does Kavo Thelmir live?", "Tell me a story."]
PROMPTS = ["<|endoftext|>User: In what town does Kose Vetael live?\nAssistant:", "The quick brown fox",
           "In the beginning God created"]
FINISH = {generator_pb2.FINISH_REASON_EOS: "stop", generator_pb2.FINISH_REASON_STOP: "stop",
          generator_pb2.FINISH_REASON_LENGTH: "length", generator_pb2.FINISH_REASON_CONTEXT: "length"}


@pytest.fixture(scope="module")
def client(http_mesh: HttpMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_mesh.base_url, api_key="unused", max_retries=0, timeout=60)


def grpc_complete(mesh: HttpMesh, **kw: Any) -> generator_pb2.CompleteResponse:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("logprobs", True)
    return mesh.generator.Complete(generator_pb2.CompleteRequest(**kw), timeout=60)


def tokens_of(mesh: HttpMesh, ids: list[int]) -> list[str]:
    tok = mesh.combiner.decoder.tokenizer
    return [tok.decode([i]) for i in ids]


def test_models_lists_the_default_the_named_compositions_and_each_role(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["default", "helpful", "amplified", *sorted(ROLES)]
    assert client.models.retrieve("amplified").model_dump()["eft"] == "base-large + 1.5*(ft-small - base-small)"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("base-huge")


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_grpc_complete_token_for_token(http_mesh, client, question, stream):
    want = grpc_complete(http_mesh, messages=[generator_pb2.ChatMessage(role="user", content=question)],
                         composition=UPSCALE, max_new_tokens=24)
    kw = dict(model="helpful", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
              logprobs=True)
    if stream:
        events = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert events[0].choices[0].delta.role == "assistant"
        choices = [e.choices[0] for e in events if e.choices]
        text = "".join(c.delta.content or "" for c in choices)
        logprobs = [lp for c in choices if c.logprobs for lp in c.logprobs.content]
        finish = [c.finish_reason for c in choices if c.finish_reason]
        assert events[-1].choices == [] and events[-1].usage is not None
        usage = events[-1].usage
    else:
        r = client.chat.completions.create(**kw)
        text, logprobs, finish, usage = (r.choices[0].message.content, r.choices[0].logprobs.content,
                                         [r.choices[0].finish_reason], r.usage)
    assert text == want.text
    assert [lp.token for lp in logprobs] == tokens_of(http_mesh, list(want.token_ids))
    assert [lp.logprob for lp in logprobs] == pytest.approx(list(want.logprobs), abs=1e-4)  # rows of other batch shapes differ in the last float bits
    assert finish == [FINISH[want.finish_reason]]
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_grpc_complete_token_for_token(http_mesh, client, prompt, stream):
    want = grpc_complete(http_mesh, prompt=prompt, composition=generator_pb2.Composition(base="base-large"),
                         max_new_tokens=12, stop=["\n\n"])
    kw = dict(model="base-large", prompt=prompt, temperature=0, max_tokens=12, logprobs=0, stop="\n\n")
    if stream:
        events = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        choices = [e.choices[0] for e in events if e.choices]
        text = "".join(c.text for c in choices)
        tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
        finish = [c.finish_reason for c in choices if c.finish_reason]
        usage = events[-1].usage
    else:
        r = client.completions.create(**kw)
        c = r.choices[0]
        text, tokens, finish, usage = c.text, c.logprobs.tokens, [c.finish_reason], r.usage
        assert c.logprobs.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-4)  # rows of other batch shapes differ in the last float bits
        assert c.logprobs.text_offset[0] == 0
    assert text == want.text
    assert tokens == tokens_of(http_mesh, list(want.token_ids))
    assert finish == [FINISH[want.finish_reason]]
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)


def test_a_named_composition_an_eft_body_and_grpc_by_name_equal_the_grpc_composition(http_mesh, client):
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    want = grpc_complete(http_mesh, messages=[generator_pb2.ChatMessage(**msgs[0])], composition=AMPLIFIED,
                         max_new_tokens=20)
    by_name = grpc_complete(http_mesh, messages=[generator_pb2.ChatMessage(**msgs[0])],
                            composition=generator_pb2.Composition(name="amplified"), max_new_tokens=20)
    assert list(by_name.token_ids) == list(want.token_ids)
    eft_object = {"base": "base-large", "deltas": [{"tuned": "ft-small", "reference": "base-small", "weight": 1.5}]}
    for model, extra in [("amplified", None), ("default", {"eft": eft_object}),
                         ("base-small", {"eft": "base-large+1.5*(ft-small-base-small)"})]:
        r = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=20, logprobs=True,
                                           extra_body=extra)
        assert [lp.token for lp in r.choices[0].logprobs.content] == tokens_of(http_mesh, list(want.token_ids)), model
        assert r.choices[0].message.content == want.text
        assert r.model == model


def test_sampling_fields_and_speculation_reach_the_generation(http_mesh, client):
    """temperature, top_p, top_k and seed mean what they mean over gRPC (same seed, same sample),
    and speculation (an extra body field) keeps greedy output exact."""
    want = grpc_complete(http_mesh, prompt=PROMPTS[1], composition=UPSCALE, max_new_tokens=16, seed=7,
                         sampling=tensor_pb2.SamplingParams(temperature=0.8, top_p=0.9, top_k=50))
    r = client.completions.create(model="helpful", prompt=PROMPTS[1], max_tokens=16, seed=7, temperature=0.8,
                                  top_p=0.9, extra_body={"top_k": 50})
    assert r.choices[0].text == want.text
    greedy = grpc_complete(http_mesh, prompt=PROMPTS[0], composition=UPSCALE, max_new_tokens=16,
                           speculation=generator_pb2.Speculation(mode=generator_pb2.SPECULATION_MODE_OFF))
    for spec in ({"mode": "fixed", "k": 4}, {"mode": "adaptive", "max_k": 8}, {"mode": "off"}):
        r = client.completions.create(model="helpful", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                      extra_body={"speculation": spec})
        assert r.choices[0].text == greedy.text, spec


def test_max_completion_tokens_stop_and_ignore_eos(http_mesh, client):
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    r = client.chat.completions.create(model="helpful", messages=msgs, temperature=0, max_completion_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.completions.create(model="base-large", prompt=PROMPTS[1], temperature=0, max_tokens=40, stop=[" the"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and " the" not in r.choices[0].text


def test_the_sse_stream_on_the_wire(http_mesh):
    """Content type, one `data:` JSON event per chunk, the role first, usage last, then [DONE]."""
    body = {"model": "helpful", "messages": [{"role": "user", "content": QUESTIONS[1]}], "temperature": 0,
            "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    r = request(http_mesh.port, "POST", "/v1/chat/completions", body)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.events()
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert [e["choices"][0]["finish_reason"] for e in events[:-2]].count(None) == len(events) - 3


def test_an_sse_stream_goes_out_stream_interval_tokens_at_a_time(http_mesh, demo_logits):
    """--stream-interval reaches the HTTP API too (it is the scheduler's): with 3, a 7-token
    completion streams its first token alone, then 3, then 3 with the finish, where interval 1
    (the module's combiner) sends them one by one; the same text."""
    from eftmesh.combiner.scheduler import SchedulerConfig

    body = {"model": "default", "prompt": PROMPTS[1], "temperature": 0, "max_tokens": 7, "stream": True,
            "ignore_eos": True, "logprobs": 0, "speculation": {"mode": "off"}}  # (a block's tokens share a chunk)
    cs = httpmesh.http_combiner(demo_logits, scheduler=SchedulerConfig(stream_interval=3))
    try:
        assert cs.wait_serving(60)
        spaced = request(cs.http.port, "POST", "/v1/completions", body).events()
        every = request(http_mesh.port, "POST", "/v1/completions", body).events()
    finally:
        cs.stop(0)
    sizes, text = [], []  # tokens per event (its logprobs list each token), and the joined text
    for events in (spaced, every):
        choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
        sizes.append([len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]["tokens"]])
        text.append("".join(c["text"] for c in choices))
    assert sizes == [[1, 3, 3], [1] * 7] and text[0] == text[1]
    assert [e for e in spaced[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"


def test_the_load_runners_http_mode(http_mesh):
    """An HTTP/SSE scenario (load_tests/http/) through eftmesh-load: the same report as gRPC's,
    with time to first token, inter-token latency and statuses as HTTP spells them."""
    from eftmesh_lab import loadtest

    s = loadtest.Scenario.load(loadtest.Path(__file__).resolve().parents[2] / "load_tests" / "http" / "chat-stream.json")
    s = loadtest.dataclasses.replace(s, total=6, concurrency=3)
    d = loadtest.run(s, f"127.0.0.1:{http_mesh.port}").as_dict()
    assert d["call"] == "POST /v1/chat/completions" and d["status"] == {"HTTP 200": 6} and d["ok"] == 6
    assert d["completion_tokens"] > 6 and d["time_to_first_token_ms"]["p50"] > 0
    assert d["inter_token_latency_ms"]["p50"] > 0
    bad = loadtest.dataclasses.replace(s, total=2, data=({"model": "nope", "prompt": "x"},))
    d = loadtest.run(bad, f"127.0.0.1:{http_mesh.port}").as_dict()
    assert d["status"] == {"HTTP 400": 2}
    assert "| POST /v1/chat/completions |" in loadtest.markdown([loadtest.run(s, f"127.0.0.1:{http_mesh.port}").as_dict()])


def test_top_logprobs_are_the_most_likely_tokens_of_the_eft_distribution_over_both_apis(http_mesh, client):
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    want = grpc_complete(http_mesh, messages=[generator_pb2.ChatMessage(**msgs[0])], composition=UPSCALE,
                         max_new_tokens=8, top_logprobs=5)
    assert len(want.top_logprobs) == len(want.token_ids) >= 1
    for tok, lp, top in zip(want.token_ids, want.logprobs, want.top_logprobs):
        assert len(top.token_ids) == 5 and list(top.logprobs) == sorted(top.logprobs, reverse=True)
        assert top.token_ids[0] == tok and top.logprobs[0] == pytest.approx(lp, abs=1e-6)  # greedy: the best one
        assert sum(2.718281828 ** x for x in top.logprobs) <= 1.0 + 1e-5
    r = client.chat.completions.create(model="helpful", messages=msgs, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert [[a.token for a in c.top_logprobs] for c in content] == \
        [tokens_of(http_mesh, list(t.token_ids)) for t in want.top_logprobs]
    for c, t in zip(content, want.top_logprobs):
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(list(t.logprobs), abs=1e-4)
    c = client.completions.create(model="helpful", prompt=PROMPTS[0], temperature=0, max_tokens=4, logprobs=3)
    tops = c.choices[0].logprobs.top_logprobs
    assert len(tops) == len(c.choices[0].logprobs.tokens) >= 1  # one {token: log-prob} per generated token
    assert all(1 <= len(t) <= 3 for t in tops)  # 3 asked for; tokens that decode alike share a key
    assert all(max(t.values()) == pytest.approx(lp, abs=1e-4) for t, lp in zip(tops, c.choices[0].logprobs.token_logprobs))
