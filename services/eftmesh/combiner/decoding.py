"""One generation's decoding: its state, what it asks of each role per step, and what it
does with the answers. The scheduler (scheduler.py) steps every running generation together;
this module is the per-generation half, free of threads and of the network.

Plain step (Mitchell et al. 2024, eq. 4, per-timestep normalisation):
  1. every role with a non-zero coefficient scores the newest token (only tokens a role's
     cache lacks are sent),
  2. `batchmix.mix_step` forms log p = sum_r c_r * log pi_r (- log Z, taken only where a
     row is sampled or reported) for every generation,
  3. `core.sampling` applies temperature, top-k, top-p and draws the token,
  4. `TokenSink` detokenises, checks stop strings, EOS, and the length limits.

Speculative block (the paper's section 4.3; `core.speculative` holds the rule):
  1. the draft role appends what its cache lacks and samples k tokens next to its model,
     returning them with their raw rows (k + 1 of them),
  2. every other role scores the same k drafts (k + 1 rows),
  3. p = mix(rows) for all k + 1 positions; each draft's probability under process(p_i) and
     process(q_i) (q: the draft rows) while the drafts before it pass (`verify_blocks`),
  4. accept a prefix of the drafts plus one token; every cache rolls back to the accepted
     length through the next call's `start`.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eftmesh.combiner.scoring import DraftCall, ScoreCall
from eftmesh.combiner.stream import Chunk, TokenSink, Usage
from eftmesh.combiner.chat import ChatMessage, check_messages
from eftmesh.common.errors import InvalidArgument, quote
from eftmesh.core.mixing import Composition, check_role_name
from eftmesh.core.sampling import (
    NoFiniteMass,
    SamplingConfig,
    argmax_rows,
    check_argmax_finite,
    make_generator,
    no_finite_mass,
    per_row_uniforms,
    sample_rows,
)
from eftmesh.core.speculative import AcceptanceShape, AdaptiveBlockSize, Verdict, accept_greedy, verify_sampled


# Limits on what a request may list (INVALID_ARGUMENT beyond them). Stop strings are short
# markers, and each is searched for after every token, so their number and length bound the
# work per token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# The most alternatives a request may ask for per position (OpenAI's limit too).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SpeculationConfig:
    """Draft-then-verify settings of one request.

    adaptive=False drafts `k` tokens per block; adaptive=True lets `AdaptiveBlockSize` choose
    up to `k` (the request's max_k), with `cost_ratio` its c.
    """

    draft_role: str
    k: int
    adaptive: bool
    cost_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"speculation.{'max_k' if self.adaptive else 'k'} must be >= 1, got {self.k}")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, in domain types (`combiner.convert` builds it from protobuf).

    Exactly one of `prompt` and `messages`; `messages` are rendered with the chat template of
    `chat_template_role`'s model.
    """

    prompt: str
    composition: Composition
    sampling: SamplingConfig
    seed: int
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: the this-many most likely tokens at each position
    speculation: SpeculationConfig | None = None
    ignore_eos: bool = False
    # The client chose the seed: its sampled output must not depend on load, so the
    # load-aware speculation controller leaves its block size alone.
    seeded: bool = False
    messages: tuple[ChatMessage, ...] = ()
    chat_template_role: str = ""

    def __post_init__(self) -> None:
        # The one place these rules live; messages name the request field (protobuf spelling).
        if self.prompt and self.messages:
            raise ValueError("both prompt and messages are set: send one of them")
        if not self.prompt and not self.messages:
            raise ValueError("prompt is empty: send the text to continue, or messages for a chat")
        check_messages(self.messages)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for i, text in enumerate(self.stop):
            if len(text) > MAX_STOP_CHARS:
                raise ValueError(
                    f"stop[{i}] is {len(text)} characters long; stop strings are at most {MAX_STOP_CHARS}: {quote(text)}"
                )
        if self.chat_template_role:
            check_role_name(self.chat_template_role, "chat_template_role")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: set logprobs too")


class Generation:
    """The mutable state of one request inside the scheduler, and its per-step logic.

    The scheduler asks it for its calls (`draft_call`, `score_calls`), hands back the rows, and
    the generation turns the mixed distribution into tokens (`finish`). Its own seeded
    generator is consumed in the same order whatever else shares the batch, so a seeded
    request gives the same output alone or batched.
    """

    def __init__(
        self,
        req: GenerationRequest,
        ids: list[int],
        room: int,
        tokenizer: Any,
        stop_ids: Collection[int],
        deadline: float | None,
        is_cancelled: Callable[[], bool],
    ) -> None:
        coef = {r: c for r, c in req.composition.coefficients().items() if c != 0.0}
        if not coef:  # e.g. base X with delta (X - X), weight -1: nothing left to mix
            coef = {req.composition.base: 1.0}
        spec = req.speculation
        roles = list(coef) + ([spec.draft_role] if spec and spec.draft_role not in coef else [])
        self.req = req
        self.ids = ids  # prompt + generated tokens
        self.coef = coef  # role -> EFT coefficient (non-zero)
        rid = uuid.uuid4().hex
        self.sessions = {r: f"{rid}:{r}" for r in roles}  # role -> session id at its logit service
        self.cached = dict.fromkeys(roles, 0)  # role -> tokens of `ids` its cache is known to hold
        # role -> {a call's start: prompt tokens its prefix cache held} over the prompt's first pass
        self._prompt_cached: dict[str, dict[int, int]] = {}
        self._first_pass = True  # until a preemption re-sends the prompt
        self.ctx = len(ids) + room  # smallest max context of the roles used
        self.room = room
        self.gen = make_generator(req.seed)
        usage = Usage(prompt_tokens=len(ids))
        if spec:
            usage.speculation.draft_role = spec.draft_role
        self.sink = TokenSink(tokenizer, () if req.ignore_eos else stop_ids, req.stop, req.max_new_tokens, room, usage)
        self.adaptive = AdaptiveBlockSize(spec.k, spec.cost_ratio) if spec and spec.adaptive else None
        # what its blocks yield: its own until the scheduler gives it its drafter's, pooled
        self.shape = AcceptanceShape() if spec else None
        self.deadline = deadline
        self.is_cancelled = is_cancelled
        self.cancelled = False  # set by the consumer when it stops reading
        self.enqueued = time.monotonic()
        self.parked_since: float | None = None  # when a full KV cache first sent it back to the queue
        self.parked = 0  # times it was sent back
        self.not_before = 0.0  # monotonic time before which it is not re-admitted (back-off)
        self._gen_state: torch.Tensor | None = None  # its generator before this step drew anything
        self.span_context: Any = None  # the generation's span, linked from the steps it shares
        self.out: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()  # to the consumer
        # False: the consumer reads the whole answer (Complete, an HTTP request without
        # "stream"), so it is woken for its first chunk and its last only (Scheduler._deliver)
        self.streams = True
        self.woken = False  # a chunk was put on `out`
        self.touched = False  # some role may hold a cache of it
        # This step's block: k drafts and the draft role's rows ([k + 1, vocab_d]).
        self.k = 0
        self.drafts: list[int] = []
        self.draft_rows: torch.Tensor | None = None
        self.draft_probs: list[float] = []  # each draft's q(x), when the draft role sent them
        self.draft_cuts: list[tuple[float, float]] = []  # and its row's top-p cut
        # This step's piece of a long prompt (chunked prefill): role -> tokens its cache holds
        # after it; None on a step that samples.
        self.piece: dict[str, int] | None = None

    @property
    def behind(self) -> int:
        """Tokens of `ids` some mixed role's cache does not hold yet (1 on a steady decode step;
        a draft role outside the mix catches up in its own calls)."""
        return len(self.ids) - min(self.cached[r] for r in self.coef)

    def in_pieces(self, chunk: int) -> bool:
        """Whether its next step sends a piece of a long prompt (--prefill-chunk `chunk`; 0: off)."""
        return bool(chunk) and self.behind > chunk

    @property
    def load_aware(self) -> bool:
        """Whether the scheduler may cap this generation's block size by measured load: adaptive
        speculation whose output cannot depend on it (greedy), or whose seed nobody chose."""
        return self.adaptive is not None and (self.req.sampling.greedy or not self.req.seeded)

    def next_k(self, cap: int | None = None) -> int:
        """Drafts in its next block; 0 means a plain step.

        A load-aware generation drafts `cap` (the scheduler's controller chose it from measured
        step times and every generation's acceptance); the others draft their own choice: the
        request's fixed k, or `AdaptiveBlockSize`'s from acceptance alone. Either way at most
        the request's block size, and what the length and context leave.
        """
        spec = self.req.speculation
        if spec is None:
            return 0
        left = min(self.req.max_new_tokens, self.room) - self.sink.usage.completion_tokens
        if cap is not None and self.load_aware:
            want = min(cap, spec.k)
        else:
            want = self.adaptive.k if self.adaptive else spec.k
        # A block yields up to k + 1 tokens, and verifying k drafts needs k more positions in
        # every model's context.
        return max(0, min(want, left - 1, self.ctx - len(self.ids)))

    def expected_tokens(self, cap: int | None = None) -> float:
        """Tokens its next step yields on average under `cap` (a plain step: one), by its
        drafter's blocks and its own first drafts (`AcceptanceShape`)."""
        k = self.next_k(cap)
        if k == 0 or self.shape is None:  # (no shape: no speculation, so k is 0)
            return 1.0
        return self.shape.expected_tokens(k, (st := self.sink.usage.speculation).blocks, st.first_kept)

    def draft_call(self, k: int, vocab_size: int) -> DraftCall:
        """The draft role's share of a block of k (draws the draft seed from this request's generator)."""
        self.k = k
        d = self.req.speculation.draft_role
        self._gen_state = self.gen.get_state()
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        return DraftCall(d, self.sessions[d], self.ids, self.cached[d], k, self.req.sampling, seed, vocab_size)

    def score_calls(self) -> list[ScoreCall]:
        """Every role's share of this step: the newest token (plain), the k drafts (a block),
        or the next piece of a long prompt (every role, the draft role included; no rows back,
        so a prefix cache may hold all of it)."""
        if self.piece is not None:
            return [ScoreCall(r, self.sessions[r], self.ids[:t], self.cached[r], 0) for r, t in self.piece.items()]
        if self.k == 0:
            return [ScoreCall(r, self.sessions[r], self.ids, self.cached[r], 1) for r in self.coef]
        d = self.req.speculation.draft_role
        seq = self.ids + self.drafts
        return [ScoreCall(r, self.sessions[r], seq, self.cached[r], self.k + 1) for r in self.coef if r != d]

    def rows_per_role(self) -> int:
        return self.k + 1

    @property
    def keeps_scores(self) -> bool:  # its step's rows are read after its token is drawn
        return bool(self.req.logprobs)

    def finish(self, scores: torch.Tensor, verdict: Verdict | NoFiniteMass | None = None,
               target: torch.Tensor | None = None, drawn: int | None = None) -> None:
        """Turn this step's mixed distribution into tokens.

        Args:
            scores: [k + 1, vocab] EFT log-probabilities up to a per-row constant (one row for
                a plain step): `batchmix.mix_step` leaves them unnormalised.
            verdict: a sampled block's verdict, when the caller has verified it with
                `verify_blocks` and this generation's generator (what it would take here):
                NoFiniteMass when a row it read had no finite mass.
            target: greedy only: the argmax of each row of `scores`, when the caller has it
                (and has checked that scores[i, target[i]] is finite: `check_argmax_finite`).
            drawn: a sampled plain step only: its token, when the caller has drawn it with
                `sample_rows` and uniforms from `self.gen` (what it would take here). -1: its
                row had no finite mass (NoFiniteMass).
        """
        usage = self.sink.usage
        n = len(self.ids)
        cfg = self.req.sampling
        if cfg.greedy and target is None:  # the argmax of each row is all it needs
            target = argmax_rows(scores)  # [k + 1]
            check_argmax_finite(scores, target)  # NoFiniteMass: the scheduler fails this generation alone
        usage.base_calls += 1
        if self.k == 0:
            if not cfg.greedy and drawn is None:
                u, more = per_row_uniforms([self.gen])
                token, ok = sample_rows(scores, cfg, u, more=more)
                drawn = int(token[0]) if bool(ok[0]) else -1
            if drawn is not None and drawn < 0:
                raise no_finite_mass([0])
            tok = int(target[0]) if cfg.greedy else drawn
            for r in self.coef:
                self.cached[r] = n
            self._emit([tok], scores)
            return
        k, x = self.k, torch.tensor(self.drafts, dtype=torch.int64)  # [k]
        if cfg.greedy:
            verdict = accept_greedy(x, target)
        else:
            if verdict is None:  # (raises NoFiniteMass)
                verdict = verify_sampled(x, self.draft_rows[:k], scores, self.gen, cfg, self.draft_probs or None)
            elif isinstance(verdict, NoFiniteMass):
                raise verdict
        m = verdict.accepted
        # Every cache holds n + k tokens; the first n + m are right. The next call's start
        # rolls each back (the token after them, verdict.next_token, is not in any cache).
        for r in self.cached:
            self.cached[r] = n + m
        usage.speculation.record(k, m)
        for estimate in (self.adaptive, self.shape):
            if estimate is not None:
                estimate.update(m, k)
        self._emit(self.drafts[:m] + [verdict.next_token], scores)

    def _emit(self, tokens: list[int], scores: torch.Tensor) -> None:
        """Feed tokens (row j of scores is token j's EFT distribution, unnormalised) to the sink
        until it stops; a token's log-probability, when asked for, normalises its row alone."""
        for j, tok in enumerate(tokens):
            self.ids.append(tok)
            logprob = top = None
            if self.req.logprobs:
                lse = torch.logsumexp(scores[j], dim=0)
                logprob = float(scores[j, tok] - lse)
                if self.req.top_logprobs:
                    values, ids = torch.topk(scores[j], self.req.top_logprobs)  # best first
                    top = list(zip(ids.tolist(), (values - lse).tolist()))
            if self.sink.add(tok, logprob, top):
                return

    # --- transitions: the scheduler changes a generation only through these -------------------

    def begin_step(self, cap: int | None, chunk: int = 0) -> None:
        """It joins a step: its block size for it (0 = plain), under the scheduler's `cap`;
        from now on some role may hold a cache of it. With `chunk` (--prefill-chunk), a
        generation more than `chunk` tokens behind (a long prompt, a re-prefill) sends every
        role its next `chunk` tokens instead, and samples nothing this step."""
        n = len(self.ids)
        if self.in_pieces(chunk):  # each role keeps at least the last token for the step that samples
            self.piece = {r: min(n - 1, c + chunk) for r, c in self.cached.items() if c < n - 1}
            self.k = 0
        else:
            self.piece = None
            self.k = self.next_k(cap)
        self.touched = True

    def piece_done(self) -> None:
        """Every role answered this step's piece: their caches hold it (progress: a later
        preemption waits afresh)."""
        self.cached.update(self.piece)
        self.piece = None
        self.progressed()

    def drafted(self, drafts: list[int], rows: torch.Tensor, probs: Sequence[float] = (),
                cuts: Sequence[tuple[float, float]] = ()) -> None:
        """The draft role's answer for this step's block: k drafts, their k + 1 rows and, for
        sampled drafts, each one's q(x) when the role sent them (`Outcome.draft_probs`; not one
        per draft, or one outside (0, 1]: ignored, and q(x) is read from the rows instead), and
        its row's top-p cut (`Outcome.draft_cuts`; likewise unless each mass is in (0, inf))."""
        good = len(probs) == len(drafts) and all(0.0 < q <= 1.0 for q in probs)  # (NaN fails too)
        cut = len(cuts) == len(drafts) and all(0.0 < m < float("inf") and z == z for z, m in cuts)  # (z == z: not NaN)
        self.drafts, self.draft_rows = drafts, rows
        self.draft_probs, self.draft_cuts = list(probs) if good else [], list(cuts) if cut else []

    def prefilled(self, role: str, start: int, cached_tokens: int) -> None:
        """`role` answered a call of this generation from `start` (`Outcome.cached_tokens`).
        Its answers until the first token say how much of the prompt its prefix cache held (one
        call, or one per piece of a chunked prompt, a redone call counted once); once every
        role has answered, `Usage.cached_prompt_tokens` is the least of them (what the prefill
        saved in every role), at most the prompt's length. Later answers (decode steps, a
        re-prefill after a preemption or a failover) change nothing."""
        usage = self.sink.usage
        if role not in self.cached or not self._first_pass or usage.completion_tokens:
            return
        self._prompt_cached.setdefault(role, {})[start] = cached_tokens
        if len(self._prompt_cached) == len(self.cached):
            held = (sum(by_start.values()) for by_start in self._prompt_cached.values())
            usage.cached_prompt_tokens = min(usage.prompt_tokens, *held)

    def progressed(self) -> None:
        """It made progress this step: a later preemption waits afresh."""
        self.parked_since, self.parked = None, 0

    def park(self, now: float) -> None:
        """Preempted (a full KV cache; its caches were released): undo the step, and back off
        before re-admission, doubling from 10 ms up to 1 s each time it is sent back."""
        self.restart()
        self.touched = False
        if self.parked_since is None:
            self.parked_since = now
        self.not_before = now + min(1.0, 0.01 * 2 ** self.parked)
        self.parked += 1

    def restart(self) -> None:
        """Undo a step that did not complete and forget every cache (they were released): the
        next step re-sends the whole sequence and draws the same random numbers, so being
        preempted changes no output."""
        self.undo_step()
        self.cached = dict.fromkeys(self.cached, 0)
        self._first_pass = not self._prompt_cached  # the re-sent prompt's answers are not the first pass's

    def undo_step(self) -> None:
        """Take back a step that did not complete (a straggling replica's call: it sits the step
        out): the random numbers its block drew are drawn again; the caches keep what the
        generation knows them to hold (a cache ahead of that is rolled back by the next call)."""
        if self.k and self._gen_state is not None:
            self.gen.set_state(self._gen_state)
        self.k = 0
        self.drafts, self.draft_rows, self.draft_probs, self.draft_cuts, self.piece = [], None, [], [], None


# A prompt longer than max_context * this many characters is refused before it is tokenised:
# tokenising is the one cost a caller controls before the length check, and a few MB of text
# hold a CPU for seconds. No tokenizer in use packs more than a few characters into a token on
# real text (4 is typical for English, whitespace and punctuation runs reach ~16), so a prompt
# this long would be refused by the token count anyway; the bound only makes the refusal cheap.
PROMPT_CHARS_PER_TOKEN = 32


def encode_prompt(tokenizer: Any, prompt: str, max_context: int, chat: bool = False) -> tuple[list[int], int]:
    """Prompt ids and the room left for new tokens in a context of `max_context`. A rendered
    chat (`chat`) is tokenised without adding special tokens: its template wrote them."""
    what, fix = ("the conversation, rendered with its chat template,", "shorten the conversation") if chat else (
        "prompt", "shorten the prompt")
    limit = max_context * PROMPT_CHARS_PER_TOKEN
    if len(prompt) > limit:
        raise InvalidArgument(
            f"{what} is {len(prompt)} characters; the models of this composition accept at most "
            f"{max_context} tokens in all (prompt plus output), and prompts over {limit} characters "
            f"({PROMPT_CHARS_PER_TOKEN} per token) are refused before tokenising: {fix}"
        )
    ids = tokenizer.encode(prompt, add_special_tokens=False) if chat else tokenizer.encode(prompt)
    if not ids:
        raise InvalidArgument(f"{what} tokenises to nothing: send some text")
    if len(ids) >= max_context:
        raise InvalidArgument(
            f"{what} is {len(ids)} tokens; the models of this composition accept at most "
            f"{max_context} in all (prompt plus output): {fix}"
        )
    return ids, max_context - len(ids)


def new_seed() -> int:
    """A random 63-bit seed for requests that set none."""
    return uuid.uuid4().int >> 65
