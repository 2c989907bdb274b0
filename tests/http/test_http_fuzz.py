"""Property-based fuzzing of the HTTP API's bodies over a real mesh: JSON of the wrong types,
huge and non-finite numbers, unknown fields, invalid UTF-8 and truncated bodies never get a 500
(nor a stream with a server error in it), readiness stays 200, and a reference request returns
the same tokens before and after."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import httpmesh
from httpmesh import request

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
demo_logits, http_mesh = httpmesh.demo_logits, httpmesh.http_mesh  # the module's fixtures

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
PATHS = ["/v1/chat/completions", "/v1/completions"]
MODELS = ["default", "helpful", "amplified", "base-large", "ft-small", "nope", ""]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n", "tools", "response_format", "eft",
          "speculation", "top_k", "ignore_eos", "chat_template_role", "user", "echo", "best_of", "logit_bias"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 4, 2**31, 2**32, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.sampled_from(MODELS),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(FIELDS)), inner,
                                                 max_size=4)), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                           "content": st.one_of(st.text(max_size=40), values)}), max_size=3)
eft = st.one_of(values, st.sampled_from(["base-large+1.0*(ft-small-base-small)", "base-large+(", "ft-small-1e9*(a-b)"]),
                st.fixed_dictionaries({"base": st.sampled_from(["base-large", "x", ""])},
                                      optional={"deltas": st.lists(st.fixed_dictionaries(
                                          {"tuned": st.sampled_from(["ft-small", "q"]), "reference": st.just("base-small"),
                                           "weight": st.one_of(st.floats(), st.integers())}), max_size=2)}))
speculation = st.one_of(values, st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(["off", "fixed", "adaptive", "x"]), "k": st.integers(-2, 40),
    "max_k": st.integers(-2, 40), "draft_role": st.sampled_from(["ft-small", "base-large", "nobody"])}))
bodies = st.fixed_dictionaries(
    {"max_tokens": st.one_of(st.integers(-2, 6), values)},
    optional={"model": st.one_of(st.sampled_from(MODELS), values), "messages": st.one_of(messages, values),
              "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=2), values),
              "temperature": st.one_of(st.floats(-1, 3), values), "top_p": st.one_of(st.floats(-1, 2), values),
              "seed": st.one_of(st.integers(-5, 2**65), values), "stop": st.one_of(st.text(max_size=5), values),
              "stream": st.one_of(st.booleans(), values),
              "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), values),
              "logprobs": st.one_of(st.booleans(), st.integers(-1, 6), values), "top_logprobs": values,
              "eft": eft, "speculation": speculation, "n": values, "tools": values, "response_format": values,
              "top_k": st.one_of(st.integers(-2, 100), values), "ignore_eos": values,
              "chat_template_role": st.sampled_from(["ft-small", "base-large", "x"]),
              "unknown_field": values})


VALID = {"/v1/chat/completions": {"model": "helpful", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
         "/v1/completions": {"model": "helpful", "prompt": "Hi", "max_tokens": 2}}
# A valid body with one field changed, or with the random fields above laid over it.
changes = st.one_of(st.just({}), st.dictionaries(st.sampled_from([*FIELDS, "unknown_field"]), values, min_size=1,
                                                 max_size=1), bodies)


def check(reply, seen: Counter) -> None:
    seen[reply.status] += 1
    assert reply.status != 500 and reply.status < 600, (reply.status, reply.body[:300])
    if reply.status == 200 and reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = reply.events()
        assert events[-1] == "[DONE]", reply.body[-300:]
        assert not any(isinstance(e, dict) and e.get("error", {}).get("type") == "server_error" for e in events)
    elif reply.status != 200:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def reference(port: int) -> str:
    r = request(port, "POST", "/v1/completions", {"model": "helpful", "prompt": "The quick brown fox", "max_tokens": 4,
                                                  "temperature": 0, "logprobs": 0})
    assert r.status == 200, r.body
    return json.dumps(r.json()["choices"][0]["logprobs"]["tokens"])


def test_fuzz_bodies(http_mesh):
    before, seen = reference(http_mesh.port), Counter()

    @FUZZ
    @given(path=st.sampled_from(PATHS), change=changes)
    def run(path, change):
        body = {**VALID[path], **change}
        check(request(http_mesh.port, "POST", path, json.dumps(body).encode()), seen)

    run()
    assert seen[200] >= 10 and seen[400] >= 100, seen  # the fuzz reaches generations, not only the parser
    assert request(http_mesh.port, "GET", "/health/ready").status == 200
    assert reference(http_mesh.port) == before


def test_fuzz_raw_bytes(http_mesh):
    """Truncated, corrupted (invalid UTF-8) and arbitrary bytes."""
    before, seen = reference(http_mesh.port), Counter()
    valid = json.dumps({"model": "helpful", "messages": [{"role": "user", "content": "Hi there"}],
                        "max_tokens": 2}).encode()

    @FUZZ
    @given(path=st.sampled_from(PATHS), cut=st.integers(0, len(valid)), junk=st.binary(max_size=8),
           raw=st.one_of(st.none(), st.binary(max_size=64)))
    def run(path, cut, junk, raw):
        body = raw if raw is not None else valid[:cut] + junk + valid[cut + len(junk):]
        check(request(http_mesh.port, "POST", path, body), seen)

    run()
    assert seen[200] >= 1 and seen[400] >= 100, seen
    assert request(http_mesh.port, "GET", "/health/ready").status == 200
    assert reference(http_mesh.port) == before
