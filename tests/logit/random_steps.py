"""Random decode / verify / rollback workloads, shared by the runner's equality tests
(static against eager, compiled against eager)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit.buckets import GraphConfig

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


def fits(items: list[ScoreItem], graphs: GraphConfig) -> bool:
    """Whether every item of the step lies in one static bucket."""
    return (max(len(it.tokens) for it in items) <= graphs.max_query
            and max(it.start for it in items) + graphs.max_query <= graphs.max_context
            and len(items) <= graphs.max_batch)


def assert_same_rows(eager: ModelEngine, other: ModelEngine, graphs: GraphConfig, prompts: list[int],
                     steps: list[list[tuple[str, int]]], seed: int, positions: int, same: float) -> None:
    """Run one random workload through both engines (same weights): every step's rows agree
    within `same`, a step that fits a bucket takes `other`'s static path (when it has one), and releasing every
    session frees every block."""
    vocab = eager.info.tokenizer_vocab_size  # len(tokenizer)
    g = torch.Generator().manual_seed(seed)
    seqs = {f"s{i}": torch.randint(0, vocab, (n,), generator=g).tolist() for i, n in enumerate(prompts)}
    for engine in (eager, other):  # prefills: eager in both
        engine.score_batch([ScoreItem(sid, 0, s, 1) for sid, s in seqs.items()])
    for plan in steps:
        items = step_items(plan, seqs, vocab, g, positions)
        if not items:
            continue
        static_before = other.runner.static_steps
        for w, r in zip(eager.score_batch(items), other.score_batch(items)):
            assert w.error is None and r.error is None
            assert w.cache_length == r.cache_length
            assert (w.rows - r.rows).abs().max().item() <= same
        if other.runner.static and fits(items, graphs):  # every item in one bucket: a forward took the static path
            assert other.runner.static_steps > static_before
    for engine in (eager, other):
        for sid in seqs:
            engine.release(sid)
        assert engine.pool.free_blocks == engine.pool.num_blocks


# A trained model's prompts for the bfloat16 greedy checks (the demo base-large): random
# weights tie in bfloat16 too often for greedy tokens to be a fair check. On the CPU, the
# tiny random Llama's static and eager bfloat16 paths part at step 24, at an exact tie of its
# two best logits; the demo family's three models agree over 64 steps from each of these.
GREEDY_PROMPTS = ["The capital of the old kingdom was", "Question: who built the bridge at Brackwell? Answer:",
                  "Once upon a time"]


def greedy_tokens(engine: ModelEngine, prompt: list[int], steps: int, session: str = "greedy") -> list[int]:
    """`steps` greedy tokens after `prompt`: one prefill, then one decode step per token."""
    seq = list(prompt)
    r = engine.score_batch([ScoreItem(session, 0, seq, 1)])[0]
    for _ in range(steps):
        assert r.error is None, r.error
        seq.append(int(r.rows[-1].float().argmax()))
        r = engine.score_batch([ScoreItem(session, len(seq) - 1, seq[-1:], 1)])[0]
    engine.release(session)
    return seq[len(prompt):]


def forced_worst_gap(eager: ModelEngine, other: ModelEngine, prompt: list[int], steps: int) -> float:
    """Both engines fed the same tokens (eager's greedy ones, so a near-tie cannot send them
    apart): the largest difference of any log-probability between their rows over `steps`
    decode steps."""
    seq, worst = list(prompt), 0.0
    rows = [e.score_batch([ScoreItem("forced", 0, seq, 1)])[0].rows[-1].float() for e in (eager, other)]
    for _ in range(steps):
        a, b = (r.log_softmax(-1) for r in rows)
        worst = max(worst, (a - b).abs().max().item())
        seq.append(int(rows[0].argmax()))
        rows = [e.score_batch([ScoreItem("forced", len(seq) - 1, seq[-1:], 1)])[0].rows[-1].float() for e in (eager, other)]
    for e in (eager, other):
        e.release("forced")
    return worst
