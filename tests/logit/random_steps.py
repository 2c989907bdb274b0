"""Random decode / verify / rollback workloads, shared by the runner's equality tests
(static against eager, compiled against eager)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from eftmesh.logit.engine import ScoreItem

# One step of a random workload: per session, either a decode (1 token), a verify of k
# drafts (k + 1 tokens, k + 1 rows), or a rollback of r tokens followed by a decode.
step = st.lists(st.tuples(st.sampled_from(["decode", "verify", "rollback"]), st.integers(1, 5)), min_size=1,
                max_size=11)


def step_items(plan: list[tuple[str, int]], seqs: dict[str, list[int]], vocab: int, g: torch.Generator,
               positions: int) -> list[ScoreItem]:
    """The ScoreItems of one planned step over `seqs` (session id -> its tokens, extended in
    place by what the step appends); sessions that would pass `positions` sit it out."""
    items = []
    for (kind, x), (sid, s) in zip(plan, seqs.items()):
        if kind == "rollback":
            del s[max(1, len(s) - x):]
        start = len(s)
        new = torch.randint(0, vocab, (x + 1 if kind == "verify" else 1,), generator=g).tolist()
        if start + len(new) > positions:
            continue
        items.append(ScoreItem(sid, start, new, len(new)))
        s.extend(new)
    return items


def fits(items: list[ScoreItem], max_query: int, max_context: int, max_batch: int) -> bool:
    """Whether every item of the step lies in one static bucket."""
    return (max(len(it.tokens) for it in items) <= max_query
            and max(it.start for it in items) + max_query <= max_context and len(items) <= max_batch)
