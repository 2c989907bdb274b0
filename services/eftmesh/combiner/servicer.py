"""Generator servicer: protobuf <-> domain at the edge, one span per generation.

The span is `eftmesh.generate` (an INTERNAL span under the gRPC server span; the GenAI
conventions let a system name its spans, and dashboards and the scheduler's step links know
this name), with the conventions' attributes: gen_ai.operation.name, gen_ai.provider.name,
gen_ai.request.*, gen_ai.usage.*, gen_ai.response.finish_reasons, and error.type on failure."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from eftmesh.combiner.decoding import (
    Chunk,
    FinishReason,
    GenerationRequest,
    SpeculationConfig,
    TokenSink,
    Usage,
    deadline_from,
    new_seed,
)
from eftmesh.combiner.scheduler import Decoder
from eftmesh.common.convert import sampling_from_pb, sampling_to_pb
from eftmesh.common.errors import InvalidArgument, NotFound, ResourceExhausted, quote
from eftmesh.common.metrics import CombinerMetrics, error_type, gen_ai_attributes, meter, outcome
from eftmesh.core.mixing import MAX_WEIGHT, Composition, Delta
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

_FINISH_TO_PB = {
    FinishReason.LENGTH: generator_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generator_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generator_pb2.FINISH_REASON_STOP,
    FinishReason.CONTEXT: generator_pb2.FINISH_REASON_CONTEXT,
}


# Limits on what a request may name or list (INVALID_ARGUMENT beyond them). Role names are
# configured names like "base-large"; stop strings are short markers, and each is searched for
# after every token, so their number and length bound the work per token.
MAX_ROLE_NAME_BYTES = 128
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_role_name(name: str, field: str) -> None:
    """A role name longer than MAX_ROLE_NAME_BYTES (UTF-8) is refused before any lookup."""
    n = len(name.encode("utf-8", "surrogatepass"))
    if n > MAX_ROLE_NAME_BYTES:
        raise InvalidArgument(f"{field} is {n} bytes long; role names are at most {MAX_ROLE_NAME_BYTES} bytes: {quote(name)}")


def stops_from_pb(stop: Sequence[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(
                f"stop[{i}] is {len(s)} characters long; stop strings are at most {MAX_STOP_CHARS}: {quote(s)}"
            )
    return tuple(s for s in stop if s)


_MODE_NAMES = {"off": generator_pb2.SPECULATION_MODE_OFF, "fixed": generator_pb2.SPECULATION_MODE_FIXED,
               "adaptive": generator_pb2.SPECULATION_MODE_ADAPTIVE}


@dataclass(frozen=True)
class SpeculationDefaults:
    """The combiner's speculation settings (flags --speculation, --block-size, --max-block,
    --draft-cost-ratio)."""

    mode: str = "adaptive"  # off | fixed | adaptive
    block_size: int = 4  # k of fixed mode
    max_block: int = 16  # the largest k any request may use; adaptive's default cap
    cost_ratio: float = 0.1  # adaptive's c: one draft token's cost over one verify step

    def __post_init__(self) -> None:
        if self.mode not in _MODE_NAMES:
            raise ValueError(f"speculation mode must be one of {sorted(_MODE_NAMES)}, got {self.mode!r}")
        if not 1 <= self.block_size <= self.max_block:
            raise ValueError("block size must be in [1, max block]")
        if not self.cost_ratio > 0:
            raise ValueError("draft cost ratio must be > 0")


@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves unset, and the limits it must keep."""

    composition: Composition
    sampling: SamplingConfig
    max_new_tokens: int = 64
    max_new_tokens_cap: int = 1024
    speculation: SpeculationDefaults = SpeculationDefaults()


def composition_from_pb(msg: generator_pb2.Composition, default: Composition, roles: Mapping[str, object]) -> Composition:
    if not msg.base and not msg.deltas:
        return default
    if not msg.base:
        raise InvalidArgument("composition.base is empty but deltas are set: name the base role")
    check_role_name(msg.base, "composition.base")
    deltas = []
    for i, d in enumerate(msg.deltas):
        if not d.tuned or not d.reference:
            raise InvalidArgument(f"composition.deltas[{i}] needs both tuned and reference roles")
        check_role_name(d.tuned, f"composition.deltas[{i}].tuned")
        check_role_name(d.reference, f"composition.deltas[{i}].reference")
        if not math.isfinite(d.weight) or abs(d.weight) > MAX_WEIGHT:
            raise InvalidArgument(
                f"composition.deltas[{i}].weight must be finite and in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {d.weight:g}"
            )
        deltas.append(Delta(d.tuned, d.reference, d.weight))
    comp = Composition(msg.base, tuple(deltas))
    unknown = [r for r in comp.roles if r not in roles]
    if unknown:
        raise NotFound(f"unknown role(s) {', '.join(map(quote, unknown))}; this combiner serves {', '.join(sorted(roles))}")
    return comp


def speculation_from_pb(
    msg: generator_pb2.Speculation, comp: Composition, d: SpeculationDefaults, roles: Mapping[str, object]
) -> SpeculationConfig | None:
    """The request's speculation, or None for plain decoding."""
    mode = msg.mode or _MODE_NAMES[d.mode]
    if mode == generator_pb2.SPECULATION_MODE_OFF:
        return None
    if mode not in (generator_pb2.SPECULATION_MODE_FIXED, generator_pb2.SPECULATION_MODE_ADAPTIVE):
        raise InvalidArgument(f"speculation.mode {mode} is not a known SpeculationMode")
    check_role_name(msg.draft_role, "speculation.draft_role")
    draft = msg.draft_role or (comp.deltas[0].tuned if comp.deltas else "")
    if not draft:
        if msg.mode:  # asked for explicitly, but there is nothing to draft with
            raise InvalidArgument("speculation needs a draft role: set speculation.draft_role or add a delta")
        return None
    if draft not in roles:
        raise NotFound(f"unknown draft role {quote(draft)}; this combiner serves {', '.join(sorted(roles))}")
    adaptive = mode == generator_pb2.SPECULATION_MODE_ADAPTIVE
    k = msg.block_size or (d.max_block if adaptive else d.block_size)
    if k > d.max_block:
        raise InvalidArgument(f"speculation.block_size must be in [1, {d.max_block}], got {k}")
    return SpeculationConfig(draft_role=draft, block_size=k, adaptive=adaptive, cost_ratio=d.cost_ratio)


def speculation_to_pb(d: SpeculationDefaults) -> generator_pb2.Speculation:
    """The defaults as a request would spell them (adaptive's block_size is its cap)."""
    k = d.max_block if d.mode == "adaptive" else d.block_size
    return generator_pb2.Speculation(mode=_MODE_NAMES[d.mode], block_size=k)


def stats_to_pb(u: Usage) -> generator_pb2.SpeculationStats:
    s = u.speculation
    return generator_pb2.SpeculationStats(
        drafted_tokens=s.drafted,
        accepted_tokens=s.accepted,
        acceptance_rate=s.acceptance_rate,
        base_calls_per_token=u.base_calls_per_token,
        blocks=s.blocks,
        draft_role=s.draft_role,
    )


def request_from_pb(
    msg: generator_pb2.GenerateRequest | generator_pb2.CompleteRequest,
    defaults: Defaults,
    roles: Mapping[str, object],
) -> GenerationRequest:
    """Validate and convert a Generate or Complete request; a caller's mistake raises."""
    if not msg.prompt:
        raise InvalidArgument("prompt is empty: send the text to continue")
    n = msg.max_new_tokens if msg.HasField("max_new_tokens") else defaults.max_new_tokens
    if n < 1 or n > defaults.max_new_tokens_cap:
        raise InvalidArgument(f"max_new_tokens must be in [1, {defaults.max_new_tokens_cap}], got {n}")
    composition = composition_from_pb(msg.composition, defaults.composition, roles)
    return GenerationRequest(
        prompt=msg.prompt,
        composition=composition,
        speculation=speculation_from_pb(msg.speculation, composition, defaults.speculation, roles),
        sampling=sampling_from_pb(msg.sampling, defaults.sampling),
        seed=msg.seed if msg.HasField("seed") else new_seed(),
        seeded=msg.HasField("seed"),
        max_new_tokens=n,
        stop=stops_from_pb(msg.stop),
        logprobs=msg.logprobs,
        ignore_eos=msg.ignore_eos,
    )


def composition_to_pb(c: Composition) -> generator_pb2.Composition:
    return generator_pb2.Composition(
        base=c.base,
        deltas=[generator_pb2.Delta(tuned=d.tuned, reference=d.reference, weight=d.weight) for d in c.deltas],
    )


def _set_ending(msg: generator_pb2.GenerateResponse | generator_pb2.CompleteResponse, c: Chunk) -> None:
    """Finish reason, usage and speculation stats: what the last chunk carries."""
    if c.finish_reason is not None:
        msg.finish_reason = _FINISH_TO_PB[c.finish_reason]
    if c.usage is not None:
        msg.usage.prompt_tokens = c.usage.prompt_tokens
        msg.usage.completion_tokens = c.usage.completion_tokens
        msg.speculation.CopyFrom(stats_to_pb(c.usage))


def chunk_to_pb(c: Chunk) -> generator_pb2.GenerateResponse:
    msg = generator_pb2.GenerateResponse(token_ids=c.token_ids, text=c.text, logprobs=c.logprobs)
    _set_ending(msg, c)
    return msg


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(
        self,
        decoder: Decoder,
        defaults: Defaults,
        fingerprint: str,
        max_concurrent_generations: int,
        tracer: trace.Tracer,
        metrics: CombinerMetrics | None = None,
    ) -> None:
        self.decoder = decoder
        self.defaults = defaults
        self.fingerprint = fingerprint
        self.tracer = tracer
        self.metrics = metrics or CombinerMetrics(meter(None, "eftmesh.combiner"))
        self._slots = threading.BoundedSemaphore(max_concurrent_generations)
        self._limit = max_concurrent_generations

    @contextmanager
    def _slot(self, attrs: Mapping[str, str]) -> Iterator[None]:
        # Overload is refused at once: a queue here would only turn into client time-outs.
        if not self._slots.acquire(blocking=False):
            self.metrics.rejected.add(1, attrs)
            raise ResourceExhausted(
                f"the combiner is running its limit of {self._limit} generations; retry with back-off"
            )
        try:
            yield
        finally:
            self._slots.release()

    def _run(
        self, request: generator_pb2.GenerateRequest | generator_pb2.CompleteRequest,
        context: grpc.ServicerContext, rpc: str,
    ) -> Iterator[Chunk]:
        """One generation, from the request message on, with its metrics: duration by outcome
        (refusals included: invalid, RESOURCE_EXHAUSTED at admission, ...), and for successful
        generations time to first token and time per output token; tokens, speculation
        acceptance, generations in flight. Attributes follow the GenAI semantic conventions
        (see eftmesh.common.metrics)."""
        m, start, first, tokens, error = self.metrics, time.perf_counter(), None, 0, None
        attrs: dict[str, str] = {**gen_ai_attributes(), "rpc.method": rpc}
        try:
            req = request_from_pb(request, self.defaults, self.decoder.scorer.models)
            attrs["gen_ai.request.model"] = req.composition.describe()
            for chunk in self._traced(req, context, attrs):
                if chunk.token_ids:
                    if first is None:
                        first = time.perf_counter() - start
                    tokens += len(chunk.token_ids)
                if chunk.usage is not None:
                    u = chunk.usage
                    gen_ai = gen_ai_attributes(attrs["gen_ai.request.model"])
                    m.tokens.add(u.prompt_tokens, {**gen_ai, "gen_ai.token.type": "input"})
                    m.tokens.add(u.completion_tokens, {**gen_ai, "gen_ai.token.type": "output"})
                    if u.speculation.drafted:
                        m.acceptance.record(u.speculation.acceptance_rate, {"eftmesh.draft_role": req.speculation.draft_role})
                yield chunk
        except BaseException as e:  # GeneratorExit too: the client went away mid-stream
            error = e
            raise
        finally:
            elapsed = time.perf_counter() - start
            done = {**attrs, "rpc.grpc.status_code": outcome(error)}
            if error is not None:
                done["error.type"] = error_type(error)
            m.request_duration.record(elapsed, done)
            if error is None and first is not None:  # the conventions: successful responses only
                m.time_to_first_token.record(first, attrs)
                if tokens > 1:
                    m.time_per_output_token.record((elapsed - first) / (tokens - 1), attrs)

    def _traced(self, req: GenerationRequest, context: grpc.ServicerContext, base: Mapping[str, str]) -> Iterator[Chunk]:
        """The generation span (GenAI semantic conventions, plus eftmesh.* figures); admission
        happens inside it, so a refused generation is a span with error.type too."""
        attrs = {
            **{k: v for k, v in base.items() if k.startswith("gen_ai.")},
            "gen_ai.request.temperature": req.sampling.temperature,
            "gen_ai.request.top_p": req.sampling.top_p,
            "gen_ai.request.top_k": req.sampling.top_k,
            "gen_ai.request.max_tokens": req.max_new_tokens,
            "gen_ai.request.seed": req.seed,
            "eftmesh.roles": list(req.composition.roles),
            "eftmesh.speculation.mode": "off" if req.speculation is None else ("adaptive" if req.speculation.adaptive else "fixed"),
        }
        if req.stop:
            attrs["gen_ai.request.stop_sequences"] = list(req.stop)
        if req.speculation is not None:
            attrs["eftmesh.speculation.draft_role"] = req.speculation.draft_role
            attrs["eftmesh.speculation.block_size"] = req.speculation.block_size
        with self.tracer.start_as_current_span("eftmesh.generate", attributes=attrs) as span:

            def on_finish(sink: TokenSink) -> None:
                span.set_attribute("gen_ai.usage.input_tokens", sink.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", sink.usage.completion_tokens)
                if sink.finish_reason is not None:
                    span.set_attribute("gen_ai.response.finish_reasons", [sink.finish_reason.value])
                u = sink.usage
                span.set_attribute("eftmesh.speculation.drafted_tokens", u.speculation.drafted)
                span.set_attribute("eftmesh.speculation.accepted_tokens", u.speculation.accepted)
                span.set_attribute("eftmesh.speculation.acceptance_rate", u.speculation.acceptance_rate)
                span.set_attribute("eftmesh.speculation.blocks", u.speculation.blocks)
                span.set_attribute("eftmesh.base_calls_per_token", u.base_calls_per_token)

            try:
                with self._slot(base):
                    self.metrics.active.add(1)
                    try:
                        yield from self.decoder.generate(
                            req,
                            deadline=deadline_from(context.time_remaining()),
                            is_cancelled=lambda: not context.is_active(),
                            on_finish=on_finish,
                        )
                    finally:
                        self.metrics.active.add(-1)
            except BaseException as e:
                span.set_attribute("error.type", error_type(e))
                span.set_status(Status(StatusCode.ERROR, str(e) or error_type(e)))
                raise

    def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generator_pb2.GenerateResponse]:
        for chunk in self._run(request, context, "Generate"):
            yield chunk_to_pb(chunk)

    def Complete(
        self, request: generator_pb2.CompleteRequest, context: grpc.ServicerContext
    ) -> generator_pb2.CompleteResponse:
        resp = generator_pb2.CompleteResponse()
        text = []
        for chunk in self._run(request, context, "Complete"):
            resp.token_ids.extend(chunk.token_ids)
            resp.logprobs.extend(chunk.logprobs)
            text.append(chunk.text)
            _set_ending(resp, chunk)
        resp.text = "".join(text)
        return resp

    def Info(
        self, request: generator_pb2.GeneratorInfoRequest, context: grpc.ServicerContext
    ) -> generator_pb2.GeneratorInfoResponse:
        d = self.defaults
        return generator_pb2.GeneratorInfoResponse(
            upstreams=[
                generator_pb2.Upstream(
                    role=m.role, address=m.address, model_id=m.model_id, vocab_size=m.vocab_size,
                    max_context=m.max_context, dtype=m.dtype, device=m.device,
                )
                for m in self.decoder.scorer.models.values()
            ],
            default_composition=composition_to_pb(d.composition),
            default_sampling=sampling_to_pb(d.sampling),
            default_max_new_tokens=d.max_new_tokens,
            max_new_tokens_cap=d.max_new_tokens_cap,
            tokenizer_fingerprint=self.fingerprint,
            vocab_size=self.decoder.vocab_size,
            default_speculation=speculation_to_pb(d.speculation),
        )
