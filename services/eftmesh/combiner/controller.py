"""The load-aware speculation controller: which cap on k the scheduler's next step drafts under.

Pure: no threads, no network; the scheduler asks `choose` before a step and tells `observe`
how long it took.
"""

from __future__ import annotations


import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from eftmesh.combiner.scoring import BlockCap
from eftmesh.core.speculative import AcceptanceShape


@dataclass
class _ArmStats:
    ratios: deque[float] = field(default_factory=lambda: deque(maxlen=3))  # its last step times over the level
    cost: float = 0.0  # their lower median: a step's duration under this cap, over the bucket's level
    tries: int = 0
    last: int = -1  # step it was last used


@dataclass
class SpeculationController:
    """Chooses the cap on k for load-aware generations: the cap whose steps deliver the most
    expected tokens per second, from what it measures.

    What a block of k drafts yields is estimated from acceptance (`AcceptanceShape`, one per
    draft role, pooling every block it drafted: `shape`); what a batched verify costs depends on
    the load, so it is measured rather than assumed: per batch-size bucket (powers of two) and
    per cap (0 = no drafting, 1, 2, 4, ..., max_k), the step's duration. The expected yield of
    a cap comes from the caller (each generation's, by its drafter's shape and its own first
    drafts), so the choice rests on step times, which vary far less than one step's accepted
    tokens.

    Step times drift while the batch runs: every generation's context grows, and a demo
    family's step at 16 streams took 11 ms without drafting at the start of 256 tokens and 17
    ms at the end (cap 4: 17 -> 38 ms). Averages of absolute times then compare the cap in use,
    timed now, with caps explored a while ago at shorter contexts, which look cheaper than they
    are: the controller kept leaving the best cap for them (40% of its steps at 16 streams in
    one such run, and k = 4 fixed beat it by 8%). So a step's time is read as the bucket's
    level, which every step moves, times the cap's cost relative to it, measured per cap where
    the cap changes from one step to the next (`observe`).
    Only the costs' ratios decide, and a cap explored long ago keeps its ratio, not its stale
    time.

    One slow step must not decide either: a step that a collection pause or a busy host
    stretched 5x (a 114 ms step among 20-25 ms ones in a bench-load run) made, averaged in, cap
    4 look worse than cap 2 for the rest of the run, and k = 4 fixed beat the controller by
    9-13% at 16 streams and 256 tokens. So a cap's cost is the lower median of its last three
    samples: an outlier among them is outvoted, and of two the smaller is taken, because
    timing noise on a shared host adds time and never removes it. The level is likewise the
    lower median of the last three steps' times, each over its cap's cost, so one slow step
    moves neither it nor the samples read against it next (the moving average it replaced,
    which one 5x step raised 3x, made the next cap explored look 3x cheaper than it was).

    The search is local, because a step under a far-off cap can cost as much as many plain
    steps (a verify of 16 drafts for each of 16 generations runs 272 rows): a bucket never
    timed starts at the best cap of the nearest bucket that was, or, when none was, at the
    caller's `start` (the scheduler passes the k the generations' acceptance alone suggests,
    `AdaptiveBlockSize`; max_k without one); after that only the best cap's
    two neighbours and no drafting (the cheapest step to time) are tried, each once as soon as
    the best cap moves next to it, then every `explore_every` steps the least recently used of
    them again (every quarter of that while one has fewer than three samples), so the choice
    follows the load. Light load: drafting wins (a step's fixed costs
    dominate); on a saturated device a verify of k drafts costs about k + 1 plain steps and the
    cap walks down, to 0.
    """

    cap: BlockCap | int  # the largest cap (BlockCap: the combiner's, shared; an int: fixed)
    explore_every: int = 16
    _stats: dict[tuple[int, int], _ArmStats] = field(default_factory=dict)
    # bucket -> its last steps' seconds over their caps' costs; their lower median is the level
    _levels: dict[int, deque[float]] = field(default_factory=dict)
    _last: dict[int, int] = field(default_factory=dict)  # bucket -> the cap its last timed step ran
    _step: int = 0
    _shapes: dict[str, AcceptanceShape] = field(default_factory=dict)  # draft role -> its blocks' shape

    @property
    def max_k(self) -> int:
        return self.cap.value if isinstance(self.cap, BlockCap) else self.cap

    def shape(self, draft_role: str) -> AcceptanceShape:
        """How acceptance runs along the blocks `draft_role` drafts, pooled over its
        generations; each one adds its blocks there and bends its expected tokens by it."""
        return self._shapes.setdefault(draft_role, AcceptanceShape())

    def arms(self) -> list[int]:
        top = self.max_k
        caps = [0] + [c for c in (1, 2, 4, 8, 16, 32) if c < top] + [top]
        return sorted(set(caps))

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, batch))))

    def _best(self, b: int, expected_tokens: Callable[[int], float]) -> int | None:
        """Index in arms() of the cap with the most expected tokens per measured second in
        bucket `b` (per unit of its cost: the level is common to all); None when nothing was
        timed there."""
        arms = self.arms()
        rates = {i: expected_tokens(arm) / s.cost for i, arm in enumerate(arms)
                 if (s := self._stats.get((b, arm))) is not None and s.cost > 0}
        return max(rates, key=rates.__getitem__) if rates else None

    def choose(self, batch: int, expected_tokens: Callable[[int], float], start: int | None = None) -> int:
        """The cap on k for the next step of a batch of `batch` generations;
        `expected_tokens(cap)` is what the batch would yield in one step under that cap, and
        `start` the k to begin at while nothing was timed (the largest cap not above it)."""
        self._step += 1
        b = self.bucket(batch)
        arms = self.arms()
        best = self._best(b, expected_tokens)
        if best is None:  # a bucket never timed: where the nearest timed bucket is best
            timed = sorted({tb for tb, _ in self._stats}, key=lambda tb: (abs(math.log2(tb / b)), -tb))
            seed = self._best(timed[0], expected_tokens) if timed else None
            if seed is not None:
                return arms[seed]
            return arms[-1] if start is None else max(arm for arm in arms if arm <= max(start, 0))
        near = [i for i in dict.fromkeys((best - 1, best + 1, 0)) if 0 <= i < len(arms) and i != best]
        stats = [self._stats.get((b, arm)) for arm in arms]
        untried = [i for i in near if stats[i] is None]
        if untried:
            return arms[untried[0]]
        # A cap timed once under other conditions is never left standing on one noisy sample;
        # one with fewer than three (whose lower median one slow step still sets) is re-timed
        # four times as often: at one stream one early slow sample kept cap 8, the fastest, off
        # for a whole run (318 tokens/s under cap 4 against 368 under 8).
        thin = [i for i in near if len(stats[i].ratios) < 3]
        if near and self._step % (max(1, self.explore_every // 4) if thin else self.explore_every) == 0:
            return arms[min(thin or near, key=lambda i: stats[i].last)]
        return arms[best]

    def observe(self, batch: int, cap: int, seconds: float) -> None:
        """Record one step's duration under `cap`.

        A step under the cap the bucket's step before ran moves only the level (its cost is
        what a switch measured): one cap's steps in a row cannot tell a growing context from
        the cap costing more, and charging the growth to the cap in use made it look worse than
        caps timed long ago. A step under another cap is read against the level the step
        before left, a near-simultaneous comparison, and moves that cap's cost."""
        if seconds <= 0:
            return
        b = self.bucket(batch)
        s = self._stats.setdefault((b, cap), _ArmStats())
        levels = self._levels.setdefault(b, deque(maxlen=3))
        if not levels:  # the bucket's first sample sets its level: this cap costs 1
            s.ratios.append(1.0)
        elif self._last.get(b) != cap or s.tries == 0:
            s.ratios.append(seconds / statistics.median_low(levels))
        s.cost = statistics.median_low(s.ratios)
        levels.append(seconds / s.cost)
        self._last[b] = cap
        s.tries += 1
        s.last = self._step

    def snapshot(self) -> dict[int, dict[int, float]]:
        """bucket -> cap -> a step's milliseconds under it at the bucket's current level (for
        logs and benchmarks)."""
        out: dict[int, dict[int, float]] = {}
        for (b, cap), s in sorted(self._stats.items()):
            out.setdefault(b, {})[cap] = round(s.cost * statistics.median_low(self._levels[b]) * 1e3, 2)
        return out
