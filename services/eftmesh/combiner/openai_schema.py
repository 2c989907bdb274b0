"""The OpenAI-compatible request bodies (pydantic) and their translation to the combiner's
`GenerateRequest`; the response bodies built from the domain's chunks.

An HTTP request becomes the same protobuf message a gRPC client would send, so it goes through
the one validation path (`combiner.convert.request_from_pb`), the same chat rendering and the
same scheduler. What the protobuf cannot express is refused here: a field OpenAI defines that
eftmesh does not implement (`n` > 1, `tools`, `response_format`, ...) gets a 400 naming it,
never a silent ignore, and so does a field neither defines (a typo).

Extra body fields (what the `openai` client sends with `extra_body`, as vLLM's server takes):
`eft` (a composition object {base, deltas: [{tuned, reference, weight}]} or a SPEC string,
overriding the model's), `speculation` ({mode: off|fixed|adaptive, k, max_k, draft_role}),
`top_k`, `ignore_eos`, and for chat `chat_template_role`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from eftmesh.combiner import compositions
from eftmesh.combiner.convert import MODES, composition_to_pb
from eftmesh.combiner.decoding import MAX_TOP_LOGPROBS
from eftmesh.combiner.stream import Chunk, FinishReason, Usage
from eftmesh.common.errors import InvalidArgument
from eftmesh.v1 import generator_pb2, tensor_pb2

Number = StrictInt | StrictFloat
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

# OpenAI fields this server does not implement, with the values that ask for nothing (those are
# accepted: clients often send the defaults explicitly). Anything else is a 400 naming the field.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,), "store": (None, False),
    "metadata": (None, {}), "service_tier": (None, "auto", "default"), "reasoning_effort": (None,),
    "verbosity": (None,), "prompt_cache_key": (None,), "safety_identifier": (None,),
}
FINISH = {FinishReason.LENGTH: "length", FinishReason.CONTEXT: "length", FinishReason.EOS: "stop",
          FinishReason.STOP: "stop"}


class BadField(InvalidArgument):
    """INVALID_ARGUMENT about one body field, which the HTTP error names in `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Eft(_Body):
    """The `eft` extra field as an object: generator.proto's Composition in JSON."""

    class DeltaBody(_Body):
        tuned: StrictStr
        reference: StrictStr
        weight: Number = 1.0

    base: StrictStr
    deltas: list[DeltaBody] = Field(default_factory=list, max_length=64)


class SpeculationBody(_Body):
    mode: Literal["off", "fixed", "adaptive"] | None = None
    k: StrictInt | None = Field(default=None, ge=1, le=UINT32_MAX)
    max_k: StrictInt | None = Field(default=None, ge=1, le=UINT32_MAX)
    draft_role: StrictStr | None = None


class StreamOptions(_Body):
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class _Common(_Body):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=UINT64_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # an end user's id for the caller's own records; not used
    # eftmesh's extra fields
    eft: StrictStr | Eft | None = None
    speculation: SpeculationBody | None = None
    top_k: StrictInt | None = Field(default=None, ge=0, le=2**31 - 1)
    ignore_eos: StrictBool | None = None
    # OpenAI fields with no eftmesh implementation: see _NEUTRAL
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        for name in _NEUTRAL:
            if name in type(self).model_fields and name in self.model_fields_set:
                value = getattr(self, name)
                if not any(value == ok and type(value) is type(ok) for ok in _NEUTRAL[name]):
                    return name
        return None


class ContentPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None  # refused when set: no template here takes a speaker's name

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_role: StrictStr | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    best_of: Any = None
    echo: Any = None
    suffix: Any = None


def _composition(body: _Common, roles: Collection[str]) -> generator_pb2.Composition:
    model = body.model or compositions.DEFAULT_NAME
    if body.eft is None:
        return generator_pb2.Composition(name=model)
    if isinstance(body.eft, str):
        try:
            return composition_to_pb(compositions.parse_spec(body.eft, roles))
        except ValueError as e:
            raise BadField(f"eft: {e}", "eft") from None
    return generator_pb2.Composition(
        base=body.eft.base,
        deltas=[generator_pb2.Delta(tuned=d.tuned, reference=d.reference, weight=d.weight) for d in body.eft.deltas])


def to_pb(body: ChatRequest | CompletionRequest, named: Collection[str], roles: Collection[str]
          ) -> generator_pb2.GenerateRequest:
    """The GenerateRequest an HTTP body asks for (`named`: the --composition names, `roles`: the
    upstream roles); BadField or NotFound for what it cannot."""
    field = body.unsupported()
    if field is not None:
        raise BadField(f"{field}: not supported by this server (only its default value is accepted)", field)
    # The model must exist even when `eft` overrides it: a typo in it is an error, not ignored.
    if body.model is not None:
        compositions.check(body.model, named, roles)
    msg = generator_pb2.GenerateRequest(composition=_composition(body, roles))
    sampling = tensor_pb2.SamplingParams()
    if body.temperature is not None:
        sampling.temperature = body.temperature
    if body.top_p is not None:
        sampling.top_p = body.top_p
    if body.top_k is not None:
        sampling.top_k = body.top_k
    msg.sampling.CopyFrom(sampling)
    if body.seed is not None:
        msg.seed = body.seed
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    msg.stop.extend(stops)
    msg.ignore_eos = bool(body.ignore_eos)
    if body.speculation is not None:
        s = body.speculation
        msg.speculation.CopyFrom(generator_pb2.Speculation(
            mode=MODES[s.mode] if s.mode else 0, k=s.k or 0, max_k=s.max_k or 0, draft_role=s.draft_role or ""))
    if isinstance(body, ChatRequest):
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise BadField("max_tokens and max_completion_tokens differ: send one of them", "max_tokens")
        n = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs and not body.logprobs:
            raise BadField("top_logprobs needs logprobs: true", "top_logprobs")
        msg.top_logprobs = body.top_logprobs or 0
        for i, m in enumerate(body.messages):
            if m.name is not None:
                raise BadField(f"messages[{i}].name: not supported by this server", f"messages[{i}].name")
        msg.messages.extend(generator_pb2.ChatMessage(role=m.role, content=m.text()) for m in body.messages)
        msg.chat_template_role = body.chat_template_role or ""
        msg.logprobs = bool(body.logprobs)
    else:
        n = body.max_tokens
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise BadField(f"prompt: one prompt per request (got {len(prompts)}); send several requests", "prompt")
        msg.prompt = prompts[0]
        msg.logprobs = body.logprobs is not None
        msg.top_logprobs = body.logprobs or 0  # completions: logprobs N asks for the N most likely too
    if n is not None:
        msg.max_new_tokens = n
    return msg


def usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float],
                  top: Sequence[Sequence[tuple[str, float]]] = ()) -> dict[str, Any]:
    """Chat's `logprobs.content`: per token its log-prob and, when asked for, its position's
    most likely tokens (`top_logprobs`), best first."""
    return {"content": [{**_entry(t, lp), "top_logprobs": [_entry(a, alp) for a, alp in (top[i] if top else ())]}
                        for i, (t, lp) in enumerate(zip(tokens, logprobs))]}


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float], start: int = 0,
                        top: Sequence[Sequence[tuple[str, float]]] = ()) -> dict[str, Any]:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top_json = [dict(pos) for pos in top] if top else None  # completions: {token: log-prob} per position
    return {"tokens": list(tokens), "token_logprobs": list(logprobs), "top_logprobs": top_json, "text_offset": offsets}


def finish_reason(c: Chunk) -> str | None:
    return FINISH[c.finish_reason] if c.finish_reason is not None else None


class Output:
    """Response bodies of one request, in OpenAI's shape."""

    def __init__(self, tokenizer: Any, model: str, req: ChatRequest | CompletionRequest, chat: bool) -> None:
        self.tokenizer, self.model, self.chat = tokenizer, model, chat
        self.done = False  # the stream sent its last event
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.offset = 0

    @staticmethod
    def sse(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    def _tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def _top(self, top: Sequence[Sequence[tuple[int, float]]]) -> list[list[tuple[str, float]]]:
        return [[(self.tokenizer.decode([i]), lp) for i, lp in pos] for pos in top]

    def _logprobs(self, c: Chunk) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        tokens = self._tokens(list(c.token_ids))
        top = self._top(c.top_logprobs)
        if self.chat:
            return chat_logprobs(tokens, list(c.logprobs), top)
        return completion_logprobs(tokens, list(c.logprobs), self.offset, top)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk_json(self, c: Chunk | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": c.text}
            choice = {"index": 0, "delta": delta, "logprobs": None if role else self._logprobs(c),
                      "finish_reason": None if role else finish_reason(c)}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": c.text, "logprobs": self._logprobs(c), "finish_reason": finish_reason(c)}
        self.offset += len(c.text)
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, c: Chunk) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_json(c.usage)}

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        last = chunks[-1]
        ids = [t for c in chunks for t in c.token_ids]
        lps = [lp for c in chunks for lp in c.logprobs]
        top = self._top([t for c in chunks for t in c.top_logprobs])
        if self.chat:
            logprobs = chat_logprobs(self._tokens(ids), lps, top) if self.logprobs else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason(last)}
        else:
            logprobs = completion_logprobs(self._tokens(ids), lps, top=top) if self.logprobs else None
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(last)}
        return {**self._head(self.object), "choices": [choice], "usage": usage_json(last.usage)}
