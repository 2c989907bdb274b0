"""How long a step waits for one role's call before it gives up on that replica.

A replica that dies is found at once (its connection fails); one that hangs (a GC pause, a
stuck driver, a saturated node) answers nothing, and a fixed timeout would stall every
generation of the step for all of it. So, as Envoy's and gRPC's outlier detection eject a host
on latency, each call gets a deadline derived from what that role's calls have taken:

    deadline = clamp(margin * expected, floor, cap)
    expected = max(typical forward * forwards, typical seconds per token sent * tokens sent)

with `typical forward` an exponential moving average, over successful calls that sent few
tokens (decode and verify steps, drafts), of their seconds per forward run one after another
(a ScoreBatch runs one; a DraftBatch of k drafts runs k + 1: the catch-up, then one per draft),
and the per-token rate one of those that sent many (prefills), so that neither a long prompt nor
a long draft is mistaken for a hang. (A draft role's calls mix both kinds in every speculative
step; a per-call average would set a k = 8 draft aside as a straggler every step.)
The deadline applies only while another live replica of the role can take the call's
sessions over: with none, waiting is the only way to an answer, and the call keeps the full
`cap` (then fails UNAVAILABLE, naming the role). Before a role's first answer it is `cap`.

A step does not wait that long for a straggler either. Past `hold_after` (a smaller multiple
of the same estimate, `--upstream-straggler-factor`) the step goes on without the replica's
generations: they sit the step out, their call left running, and rejoin once it has answered
or been given up on and moved. So a hung replica delays the other generations by about one
call, not by the deadline (the tail-at-scale answer to a slow shard: do not make the whole
batch wait for it).

Pure: no grpc, no clock; upstream.py records and asks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# Calls that send at least this many tokens teach the per-token rate (a decode step's cost is
# the forward's fixed cost, not its one token).
PREFILL_TOKENS = 32
# The shortest straggler wait: below this a step's own jitter (a scheduler's time slice) would
# set generations aside for nothing.
STRAGGLER_FLOOR_S = 0.02


@dataclass(frozen=True)
class DeadlinePolicy:
    """--upstream-deadline-margin, --upstream-deadline-floor; the cap is --call-timeout."""

    margin: float = 10.0
    floor_s: float = 1.0
    cap_s: float = 30.0
    smoothing: float = 0.2
    # --upstream-straggler-factor: a step stops waiting for a replica's call after this many
    # times the role's expected call (at least STRAGGLER_FLOOR_S)
    straggler_factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.margin >= 1.0:
            raise ValueError(f"--upstream-deadline-margin must be >= 1, got {self.margin}")
        if not 0 < self.floor_s <= self.cap_s:
            raise ValueError(f"--upstream-deadline-floor must be in (0, --call-timeout], got {self.floor_s}")
        if not 1.0 <= self.straggler_factor <= self.margin:
            raise ValueError(f"--upstream-straggler-factor must be in [1, --upstream-deadline-margin], "
                             f"got {self.straggler_factor}")


@dataclass
class _Role:
    call_s: float | None = None  # moving average of a successful step's seconds per forward (< PREFILL_TOKENS sent)
    token_s: float | None = None  # moving average of seconds per token of prefill-sized calls


@dataclass
class CallDeadlines:
    """Per-role latency estimates and the deadlines they give; thread-safe."""

    policy: DeadlinePolicy = DeadlinePolicy()
    _roles: dict[str, _Role] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, role: str, seconds: float, tokens: int, forwards: int = 1) -> None:
        """A successful call of `role` that sent `tokens` tokens and ran `forwards` forwards one
        after another took `seconds`."""
        a = self.policy.smoothing
        with self._lock:
            r = self._roles.setdefault(role, _Role())
            if tokens < PREFILL_TOKENS:  # steps: their cost is the forwards' fixed cost
                per = seconds / max(1, forwards)
                r.call_s = per if r.call_s is None else r.call_s + a * (per - r.call_s)
            else:  # prefills: their cost grows with the tokens
                rate = seconds / tokens
                r.token_s = rate if r.token_s is None else r.token_s + a * (rate - r.token_s)

    def deadline(self, role: str, tokens: int, failover: bool, forwards: int = 1) -> tuple[float, bool]:
        """(seconds the call may take, whether that is a derived deadline). `failover`: another
        live replica of the role could take the call's sessions over."""
        p = self.policy
        expected = self._expected(role, tokens, forwards)
        if not failover or expected is None:
            return p.cap_s, False
        return min(p.cap_s, max(p.floor_s, p.margin * expected)), True

    def hold_after(self, role: str, tokens: int, forwards: int = 1) -> float | None:
        """Seconds a step waits for a call of `role` sending `tokens` tokens and running
        `forwards` forwards before it goes on without that call's generations; None before the
        role's first answer (nothing known)."""
        expected = self._expected(role, tokens, forwards)
        return None if expected is None else max(STRAGGLER_FLOOR_S, self.policy.straggler_factor * expected)

    def _expected(self, role: str, tokens: int, forwards: int) -> float | None:
        """Seconds a call of `role` sending `tokens` tokens and running `forwards` forwards is
        expected to take (the module's formula); None before the role's first answer."""
        with self._lock:
            r = self._roles.get(role)
            if r is None or (r.call_s is None and r.token_s is None):
                return None
            return max((r.call_s or 0.0) * forwards, (r.token_s or 0.0) * tokens)

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """role -> the estimates (for logs and tests)."""
        with self._lock:
            return {role: {"call_s": r.call_s, "token_s": r.token_s} for role, r in self._roles.items()}
