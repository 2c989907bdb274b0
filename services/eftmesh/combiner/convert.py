"""Generator protobuf <-> domain types (TGI's from_pb / to_pb shape); the servicer calls these.

A rule that belongs to a domain type lives there (`Composition`, `SamplingConfig`,
`SpeculationConfig`, `GenerationRequest`, `ChatMessage`) and raises ValueError; this module
builds those types inside `invalid_argument()`, the one place that maps that to
INVALID_ARGUMENT. What depends on this combiner's configuration (its roles, its caps) is
checked here, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from eftmesh.combiner import compositions
from eftmesh.combiner.chat import ChatMessage
from eftmesh.combiner.decoding import GenerationRequest, SpeculationConfig, new_seed
from eftmesh.combiner.stream import Chunk, FinishReason, Usage
from eftmesh.combiner.scoring import ModelSpec
from eftmesh.common.convert import invalid_argument, sampling_from_pb, sampling_to_pb
from eftmesh.common.errors import InvalidArgument, NotFound, quote
from eftmesh.core.mixing import Composition, Delta, check_role_name
from eftmesh.core.sampling import SamplingConfig
from eftmesh.v1 import generator_pb2

MODES = {"off": generator_pb2.SPECULATION_MODE_OFF, "fixed": generator_pb2.SPECULATION_MODE_FIXED,
         "adaptive": generator_pb2.SPECULATION_MODE_ADAPTIVE}

_FINISH_TO_PB = {
    FinishReason.LENGTH: generator_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generator_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generator_pb2.FINISH_REASON_STOP,
    FinishReason.CONTEXT: generator_pb2.FINISH_REASON_CONTEXT,
}


@dataclass(frozen=True)
class SpeculationDefaults:
    """The combiner's speculation settings (flags --speculation, --k, --max-k,
    --draft-cost-ratio)."""

    mode: str = "adaptive"  # off | fixed | adaptive
    k: int = 4  # tokens drafted per block in fixed mode
    max_k: int = 16  # the largest k any request may use; adaptive's default cap
    cost_ratio: float = 0.1  # adaptive's c: one draft token's cost over one verify step

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"speculation mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if not 1 <= self.k <= self.max_k:
            raise ValueError(f"--k must be in [1, --max-k = {self.max_k}], got {self.k}")
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
    # --composition NAME=SPEC: compositions a request may name (gRPC Composition.name, the
    # HTTP API's model); see `combiner.compositions`.
    compositions: Mapping[str, Composition] = field(default_factory=dict)


def _unknown_roles(names: Iterable[str], roles: Mapping[str, object]) -> None:
    unknown = [r for r in dict.fromkeys(names) if r not in roles]
    if unknown:
        raise NotFound(f"unknown role(s) {', '.join(map(quote, unknown))}; this combiner serves {', '.join(sorted(roles))}")


def composition_from_pb(msg: generator_pb2.Composition, default: Composition, roles: Mapping[str, object],
                        named: Mapping[str, Composition] | None = None) -> Composition:
    if msg.name:
        if msg.base or msg.deltas:
            raise InvalidArgument("composition: set either name or base and deltas, not both")
        return compositions.resolve(msg.name, default, named or {}, roles)
    if not msg.base and not msg.deltas:
        return default
    with invalid_argument():
        comp = Composition(msg.base, tuple(Delta(d.tuned, d.reference, d.weight) for d in msg.deltas))
    _unknown_roles(comp.roles, roles)
    return comp


def composition_to_pb(c: Composition, name: str = "") -> generator_pb2.Composition:
    return generator_pb2.Composition(
        name=name,
        base=c.base,
        deltas=[generator_pb2.Delta(tuned=d.tuned, reference=d.reference, weight=d.weight) for d in c.deltas],
    )


def speculation_from_pb(
    msg: generator_pb2.Speculation, comp: Composition, d: SpeculationDefaults, roles: Mapping[str, object]
) -> SpeculationConfig | None:
    """The request's speculation, or None for plain decoding. Fixed mode drafts `k` tokens per
    block, adaptive chooses up to `max_k`; both are bounded by the combiner's --max-k."""
    mode = msg.mode or MODES[d.mode]
    if mode == generator_pb2.SPECULATION_MODE_OFF:
        return None
    if mode not in (generator_pb2.SPECULATION_MODE_FIXED, generator_pb2.SPECULATION_MODE_ADAPTIVE):
        raise InvalidArgument(f"speculation.mode {mode} is not a known SpeculationMode")
    with invalid_argument():
        check_role_name(msg.draft_role, "speculation.draft_role")
    draft = msg.draft_role or (comp.deltas[0].tuned if comp.deltas else "")
    if not draft:
        if msg.mode:  # asked for explicitly, but there is nothing to draft with
            raise InvalidArgument("speculation needs a draft role: set speculation.draft_role or add a delta")
        return None
    if draft not in roles:
        raise NotFound(f"unknown draft role {quote(draft)}; this combiner serves {', '.join(sorted(roles))}")
    adaptive = mode == generator_pb2.SPECULATION_MODE_ADAPTIVE
    field, k = ("max_k", msg.max_k or d.max_k) if adaptive else ("k", msg.k or d.k)
    if k > d.max_k:
        raise InvalidArgument(f"speculation.{field} must be in [1, {d.max_k}] (the combiner's --max-k), got {k}")
    with invalid_argument():
        return SpeculationConfig(draft_role=draft, k=k, adaptive=adaptive, cost_ratio=d.cost_ratio)


def speculation_to_pb(d: SpeculationDefaults) -> generator_pb2.Speculation:
    return generator_pb2.Speculation(mode=MODES[d.mode], k=d.k, max_k=d.max_k)


def messages_from_pb(messages: Iterable[generator_pb2.ChatMessage]) -> tuple[ChatMessage, ...]:
    with invalid_argument():
        return tuple(ChatMessage(m.role, m.content) for m in messages)


def request_from_pb(
    msg: generator_pb2.GenerateRequest | generator_pb2.CompleteRequest,
    defaults: Defaults,
    roles: Mapping[str, object],
) -> GenerationRequest:
    """Validate and convert a Generate or Complete request; a caller's mistake raises."""
    n = msg.max_new_tokens if msg.HasField("max_new_tokens") else defaults.max_new_tokens
    if n > defaults.max_new_tokens_cap:
        raise InvalidArgument(f"max_new_tokens must be in [1, {defaults.max_new_tokens_cap}] (this combiner's --max-new-tokens-cap), got {n}")
    composition = composition_from_pb(msg.composition, defaults.composition, roles, defaults.compositions)
    messages = messages_from_pb(msg.messages)
    template_role = msg.chat_template_role or (composition.deltas[0].tuned if composition.deltas else composition.base)
    with invalid_argument():
        req = GenerationRequest(
            prompt=msg.prompt,
            composition=composition,
            speculation=speculation_from_pb(msg.speculation, composition, defaults.speculation, roles),
            sampling=sampling_from_pb(msg.sampling, defaults.sampling),
            seed=msg.seed if msg.HasField("seed") else new_seed(),
            seeded=msg.HasField("seed"),
            max_new_tokens=n,
            stop=tuple(s for s in msg.stop if s),
            logprobs=msg.logprobs,
            top_logprobs=msg.top_logprobs,
            ignore_eos=msg.ignore_eos,
            messages=messages,
            chat_template_role=template_role if messages else msg.chat_template_role,
        )
    if req.messages:
        _unknown_roles([req.chat_template_role], roles)
    return req


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


def _set_ending(msg: generator_pb2.GenerateResponse | generator_pb2.CompleteResponse, c: Chunk) -> None:
    """Finish reason, usage and speculation stats: what the last chunk carries."""
    if c.finish_reason is not None:
        msg.finish_reason = _FINISH_TO_PB[c.finish_reason]
    if c.usage is not None:
        msg.usage.prompt_tokens = c.usage.prompt_tokens
        msg.usage.completion_tokens = c.usage.completion_tokens
        msg.usage.cached_prompt_tokens = c.usage.cached_prompt_tokens
        msg.speculation.CopyFrom(stats_to_pb(c.usage))


def _top_to_pb(top: list[list[tuple[int, float]]]) -> list[generator_pb2.TopLogprobs]:
    return [generator_pb2.TopLogprobs(token_ids=[t for t, _ in pos], logprobs=[lp for _, lp in pos]) for pos in top]


def chunk_to_pb(c: Chunk) -> generator_pb2.GenerateResponse:
    msg = generator_pb2.GenerateResponse(token_ids=c.token_ids, text=c.text, logprobs=c.logprobs,
                                         top_logprobs=_top_to_pb(c.top_logprobs))
    _set_ending(msg, c)
    return msg


def complete_to_pb(chunks: Iterable[Chunk]) -> generator_pb2.CompleteResponse:
    """A whole generation's chunks as one CompleteResponse."""
    resp, text = generator_pb2.CompleteResponse(), []
    for chunk in chunks:
        resp.token_ids.extend(chunk.token_ids)
        resp.logprobs.extend(chunk.logprobs)
        resp.top_logprobs.extend(_top_to_pb(chunk.top_logprobs))
        text.append(chunk.text)
        _set_ending(resp, chunk)
    resp.text = "".join(text)
    return resp


def info_to_pb(d: Defaults, models: Mapping[str, ModelSpec], fingerprint: str, vocab_size: int) -> generator_pb2.GeneratorInfoResponse:
    specs = list(models.values())
    return generator_pb2.GeneratorInfoResponse(
        upstreams=[
            generator_pb2.Upstream(
                role=m.role, address=m.address, model_id=m.model_id, vocab_size=m.vocab_size,
                max_context=m.max_context, dtype=m.dtype, device=m.device,
            )
            for m in specs
        ],
        default_composition=composition_to_pb(d.composition),
        default_sampling=sampling_to_pb(d.sampling),
        default_max_new_tokens=d.max_new_tokens,
        max_new_tokens_cap=d.max_new_tokens_cap,
        tokenizer_fingerprint=fingerprint,
        vocab_size=vocab_size,
        default_speculation=speculation_to_pb(d.speculation),
        chat_roles=[m.role for m in specs if m.chat_template],
        compositions=[composition_to_pb(d.composition, compositions.DEFAULT_NAME)]
        + [composition_to_pb(c, name) for name, c in d.compositions.items()],
    )
