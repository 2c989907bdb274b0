"""The combiner's decoding front: tokenises a request (a chat through its role's template),
checks it, and streams the generation the shared `Scheduler` runs. No gRPC here: the servicer
and the HTTP adapter call `Decoder.generate`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import trace

from eftmesh.combiner.chat import ChatTemplates, TemplateError
from eftmesh.combiner.decoding import Generation, GenerationRequest, encode_prompt
from eftmesh.combiner.stream import Chunk, TokenSink
from eftmesh.combiner.scheduler import Scheduler, SchedulerConfig
from eftmesh.combiner.scoring import BlockCap, Scorer
from eftmesh.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from eftmesh.common.metrics import CombinerMetrics


class Decoder:
    """The combiner's decoding front: tokenises, checks, and streams a generation run by the
    shared `Scheduler`."""

    def __init__(
        self,
        scorer: Scorer,
        tokenizer: Any,
        vocab_size: int,
        config: SchedulerConfig = SchedulerConfig(),
        max_k: BlockCap | int = 16,
        tracer: trace.Tracer | None = None,
        metrics: CombinerMetrics | None = None,
        **scheduler: Any,
    ) -> None:
        """`max_k`: the block cap (the combiner's `BlockCap`, shared with the servicer and the
        monitor; an int: fixed). `scheduler`: Scheduler's keyword options (start=False,
        clock=... in tests)."""
        self.scorer = scorer
        self.cap = max_k if isinstance(max_k, BlockCap) else BlockCap(max_k)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = tokenizer.eos_token_id
        # What ends a prompt's generation; a chat's adds its template's end-of-turn token(s).
        self._eos_ids = frozenset() if self.eos_token_id is None else frozenset([self.eos_token_id])
        self.chat = ChatTemplates(tokenizer)
        self.scheduler = Scheduler(scorer, vocab_size, config, self.cap, tracer, metrics, **scheduler)

    def close(self) -> None:
        self.scheduler.close()

    def _render(self, req: GenerationRequest) -> tuple[str, frozenset[int]]:
        """A chat request's prompt text (its role's chat template) and end-of-turn ids."""
        role = req.chat_template_role
        template = self.scorer.models[role].chat_template
        if not template:
            have = [r for r in self.scorer.models if self.scorer.models[r].chat_template]
            raise FailedPrecondition(
                f"role {role!r} has no chat template (its logit service reports none): set chat_template_role to "
                f"a role with one ({', '.join(have) or 'none has'}), start that service with --chat-template, "
                "or send a prompt"
            )
        try:
            return self.chat.render(template, req.messages)
        except TemplateError as e:
            raise InvalidArgument(str(e)) from None

    def prepare(
        self,
        req: GenerationRequest,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Generation:
        """Tokenise (a chat through its role's template) and check a request: its Generation,
        ready for `scheduler.submit`."""
        coef_roles = [r for r, c in req.composition.coefficients().items() if c != 0.0] or [req.composition.base]
        roles = coef_roles + ([req.speculation.draft_role] if req.speculation else [])
        ctx = min(self.scorer.models[r].max_context for r in roles)
        if req.messages:
            text, stop_ids = self._render(req)
            ids, room = encode_prompt(self.tokenizer, text, ctx, chat=True)
        else:
            stop_ids = self._eos_ids
            ids, room = encode_prompt(self.tokenizer, req.prompt, ctx)
        return Generation(req, ids, room, self.tokenizer, stop_ids, deadline, is_cancelled)

    def generate(
        self,
        req: GenerationRequest,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
        on_finish: Callable[[TokenSink], None] | None = None,
        stream: bool = True,
    ) -> Iterator[Chunk]:
        """Yields a chunk per plain step or speculative block; the last one finishes. Not
        `stream` (the caller joins the chunks): the first chunk, then the rest as one."""
        g = self.prepare(req, deadline, is_cancelled)
        g.streams = stream
        self.scheduler.submit(g)
        try:
            while True:
                try:
                    item = g.out.get(timeout=0.1)
                except queue.Empty:
                    if is_cancelled():
                        raise Cancelled("the client cancelled the generation") from None
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            g.cancelled = True  # the scheduler drops it (and releases its caches) if still running
            if on_finish is not None:
                on_finish(g.sink)
