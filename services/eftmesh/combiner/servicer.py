"""Generator servicer: thin. `combiner.convert` turns protobuf into domain types and back; this
admits, traces and measures each generation and hands it to the `Decoder`.

The span is `eftmesh.generate` (an INTERNAL span under the gRPC server span; the GenAI
conventions let a system name its spans, and dashboards and the scheduler's step links know
this name), with the conventions' attributes: gen_ai.operation.name, gen_ai.provider.name,
gen_ai.request.*, gen_ai.usage.*, gen_ai.response.finish_reasons, and error.type on failure."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from eftmesh.combiner import convert
from eftmesh.combiner.decoding import GenerationRequest
from eftmesh.combiner.stream import Chunk, TokenSink
from eftmesh.combiner.convert import Defaults, SpeculationDefaults  # noqa: F401  (the servicer's configuration)
from eftmesh.combiner.decoder import Decoder
from eftmesh.common.errors import ResourceExhausted
from eftmesh.common.metrics import GEN_AI_CHAT, CombinerMetrics, error_type, gen_ai_attributes, meter, outcome
from eftmesh.v1 import generator_pb2, generator_pb2_grpc


class CallContext(Protocol):
    """What a generation reads from its call: a `grpc.ServicerContext`, or the HTTP API's."""

    def time_remaining(self) -> float | None: ...

    def is_active(self) -> bool: ...


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
        self._capped: tuple[int, Defaults, Defaults] | None = None

    def effective_defaults(self) -> Defaults:
        """The configured defaults under the block cap the logit services allow (the decoder's
        `BlockCap`): --max-k, and fixed mode's --k, at most the cap."""
        cap, d = self.decoder.cap.value, self.defaults
        if d.speculation.max_k <= cap:
            return d
        if self._capped is None or self._capped[:2] != (cap, d):
            spec = dataclasses.replace(d.speculation, max_k=cap, k=min(d.speculation.k, cap))
            self._capped = (cap, d, dataclasses.replace(d, speculation=spec))
        return self._capped[2]

    @contextmanager
    def _slot(self) -> Iterator[None]:
        # Overload is refused at once: a queue here would only turn into client time-outs.
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the combiner is running its limit of {self._limit} generations; retry with back-off",
                reason="concurrency_limit")
        try:
            yield
        finally:
            self._slots.release()

    def run(
        self, request: generator_pb2.GenerateRequest | generator_pb2.CompleteRequest,
        context: CallContext, rpc: str, extra: Mapping[str, str] | None = None, stream: bool = True,
    ) -> Iterator[Chunk]:
        """One generation, from the request message on (the gRPC methods and the HTTP API,
        `combiner.http`, both come here; `extra`: more metric attributes, e.g. http.route;
        not `stream`: the caller joins the chunks, `Decoder.generate`),
        with its metrics: duration by outcome
        (refusals included: invalid, RESOURCE_EXHAUSTED at admission, ...), and for successful
        generations time to first token and time per output token; tokens, speculation
        acceptance, generations in flight. Attributes follow the GenAI semantic conventions
        (see eftmesh.common.metrics)."""
        m, start, first, tokens, error = self.metrics, time.perf_counter(), None, 0, None
        attrs: dict[str, str] = {**gen_ai_attributes(), "rpc.method": rpc, **(extra or {})}
        try:
            req = convert.request_from_pb(request, self.effective_defaults(), self.decoder.scorer.models)
            attrs["gen_ai.request.model"] = req.composition.describe()
            if req.messages:
                attrs["gen_ai.operation.name"] = GEN_AI_CHAT
            for chunk in self._traced(req, context, attrs, stream):
                if chunk.token_ids:
                    if first is None:
                        first = time.perf_counter() - start
                    tokens += len(chunk.token_ids)
                if chunk.usage is not None:
                    u = chunk.usage
                    gen_ai = gen_ai_attributes(attrs["gen_ai.request.model"], attrs["gen_ai.operation.name"])
                    m.tokens.add(u.prompt_tokens, {**gen_ai, "gen_ai.token.type": "input"})
                    m.tokens.add(u.completion_tokens, {**gen_ai, "gen_ai.token.type": "output"})
                    if u.speculation.drafted:
                        role = {"eftmesh.draft_role": req.speculation.draft_role}
                        m.acceptance.record(u.speculation.acceptance_rate, role)
                        for j, (d, a) in enumerate(zip(u.speculation.drafted_at, u.speculation.accepted_at), start=1):
                            m.drafts.add(d, {**role, "eftmesh.speculation.position": j})
                            m.drafts_accepted.add(a, {**role, "eftmesh.speculation.position": j})
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
            if done["rpc.grpc.status_code"] == "RESOURCE_EXHAUSTED":  # every refusal, by the limit hit
                m.rejected.add(1, {"rpc.method": rpc, "eftmesh.reason": getattr(error, "reason", "other")})
            if error is None and first is not None:  # the conventions: successful responses only
                m.time_to_first_token.record(first, attrs)
                if tokens > 1:
                    m.time_per_output_token.record((elapsed - first) / (tokens - 1), attrs)

    def _traced(self, req: GenerationRequest, context: CallContext, base: Mapping[str, str],
                stream: bool = True) -> Iterator[Chunk]:
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
            attrs["eftmesh.speculation.k"] = req.speculation.k
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
                with self._slot():
                    self.metrics.active.add(1)
                    try:
                        yield from self.decoder.generate(
                            req,
                            deadline=deadline_from(context.time_remaining()),
                            is_cancelled=lambda: not context.is_active(),
                            on_finish=on_finish,
                            stream=stream,
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
        for chunk in self.run(request, context, "Generate"):
            yield convert.chunk_to_pb(chunk)

    def Complete(
        self, request: generator_pb2.CompleteRequest, context: grpc.ServicerContext
    ) -> generator_pb2.CompleteResponse:
        return convert.complete_to_pb(self.run(request, context, "Complete", stream=False))

    def Info(
        self, request: generator_pb2.GeneratorInfoRequest, context: grpc.ServicerContext
    ) -> generator_pb2.GeneratorInfoResponse:
        return convert.info_to_pb(self.effective_defaults(), self.decoder.scorer.models, self.fingerprint,
                                  self.decoder.vocab_size)


def deadline_from(time_remaining: float | None) -> float | None:
    """Absolute monotonic deadline from gRPC's `context.time_remaining()`."""
    return None if time_remaining is None else time.monotonic() + time_remaining
