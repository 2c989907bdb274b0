"""The model runner's static-shaped path (what a CUDA graph captures) equals the eager path.

On this CPU the static path runs eagerly (`--cuda-graphs static`): the same padded batch,
query and context buckets, the same device-side slots, positions and mask, the same one input
buffer. Random batch compositions cross every kind of bucket: batch sizes between the
buckets, decode steps and verifies of several k in one forward, rollbacks, contexts that
grow past a bucket and past the largest one (eager there). The GPU-only checks (capture,
replay, no host sync) are in test_runner_cuda.py and run where a GPU is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from random_steps import GREEDY_PROMPTS, assert_same_rows, forced_worst_gap, greedy_tokens, step
from tiny_models import graph_llama, tiny_models
from eftmesh.core.sampling import SamplingConfig
from eftmesh.logit.engine import DraftItem, ModelEngine, ScoreItem
from eftmesh.logit.buckets import GraphConfig, batch_buckets, bucket_for, pow2_buckets
from eftmesh.logit.kvcache import BlockTable
from eftmesh.logit.placement import load_model
from eftmesh.logit.runner import StepBatch, cache_argument

SAME = 1e-5  # float32: static against eager
N_POSITIONS = 128
GRAPHS = GraphConfig(mode="static", max_batch=8, max_query=4, max_context=64)
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_models(len(tokenizer), N_POSITIONS, seed=0)


def pair(model, tokenizer) -> tuple[ModelEngine, ModelEngine]:
    """An eager engine and a static one over the same weights."""
    kw = dict(model_id="t", role="t", kv_cache_tokens=2048, kv_block_size=8, session_active_s=0.0, max_batch=16)
    return (ModelEngine(model, tokenizer, graphs=GraphConfig(mode="off"), **kw),
            ModelEngine(model, tokenizer, graphs=GRAPHS, **kw))


def test_buckets_are_vllms_batch_sizes_and_powers_of_two():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert pow2_buckets(8) == [1, 2, 4, 8] and pow2_buckets(5) == [1, 2, 4, 5]
    assert pow2_buckets(4096, lowest=64) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert bucket_for(3, [1, 2, 4]) == 4 and bucket_for(5, [1, 2, 4]) is None


def test_auto_runs_eagerly_on_a_cpu_and_static_is_reported_in_info(models, tokenizer):
    eager, static = pair(models["gpt2"], tokenizer)
    auto = ModelEngine(models["gpt2"], tokenizer, model_id="t", role="t", kv_cache_tokens=256)
    assert not auto.runner.static and auto.info.execution == "eager"
    assert static.runner.static and static.info.execution == "static"
    assert static.runner.contexts == [64] and static.runner.queries == [1, 2, 4]
    assert eager.info.execution == "eager"
    from eftmesh.logit.convert import info_to_pb

    pb = info_to_pb(static.info, "t", 0.0, 0.0)  # what LogitService.Info answers
    assert (pb.execution, pb.cuda_graphs, pb.graph_capture_s) == ("static", 0, 0.0)


def test_a_failed_capture_leaves_an_eager_service_that_says_so(models, tokenizer, caplog):
    """TGI's choice: a CUDA graph capture that fails (out of memory, an op a graph cannot hold)
    is logged and the service runs eagerly, instead of not starting. A fake here: the capture
    (CUDA only) is replaced by one that fails after two buckets."""
    eager, static = pair(models["gpt2"], tokenizer)
    runner = static.runner

    def failing() -> None:
        runner.graphs.update({(1, 1, 64): None, (2, 1, 64): None})  # two buckets captured, then:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a fake)")

    runner.capture_graphs = True
    runner._capture_all = failing
    with caplog.at_level("ERROR", logger="eftmesh.logit.runner"):
        static.warmup()
    assert "CUDA graph capture failed after 2 of" in caplog.text and "OutOfMemoryError" in caplog.text
    assert not runner.graphs and not runner.static and not runner.capture_graphs
    assert (static.info.execution, static.info.cuda_graphs, static.info.graph_capture_s) == ("eager", 0, 0.0)
    eager.warmup()
    static_before = runner.static_steps
    for items in ([ScoreItem("s", 0, list(range(5, 25)), 1)], [ScoreItem("s", 20, [7], 1)]):  # a prefill, a decode
        a, b = eager.score_batch(items)[0], static.score_batch(items)[0]
        assert b.error is None and torch.equal(a.rows, b.rows)  # the same eager path, the same logits
    assert runner.static_steps == static_before  # the decode did not take the static path


def test_recorded_buckets_share_one_output_buffer_and_their_replays_equal_eager(models, tokenizer):
    """What a capture keeps, checked on a CPU: `_record_all` with a fake recorder (a CUDA graph
    cannot be captured here) that runs the step's body once, as a capture does, and whose
    replay runs it again, as a graph reruns its kernels. Every bucket writes its logits at the
    start of one buffer, so the graphs keep one output and not one per bucket (the pool then
    reuses each step's own logits for the next capture), and replays through those views give
    the eager step's rows over decodes, verifies and rollbacks."""
    eager, static = pair(models["llama"], tokenizer)
    runner, replays = static.runner, []

    def record(body):
        body()

        def replay():
            replays.append(1)
            body()
        return replay

    vocab = static.vocab_size
    runner._record_all(record, vocab, torch.float32)
    order = runner.capture_order()
    assert set(runner.graphs) == set(order) and len(order) == len(runner.batches) * 3 * len(runner.contexts)
    assert order[0] == (max(runner.batches), max(runner.queries), max(runner.contexts))  # largest first
    outs = {shape: out for shape, (_, out) in runner.graphs.items()}
    assert len({o.untyped_storage().data_ptr() for o in outs.values()}) == 1  # one buffer for all
    assert all(o.shape == (b, q, vocab) and o.is_contiguous() and o.storage_offset() == 0
               for (b, q, _), o in outs.items())
    assert outs[order[0]].untyped_storage().nbytes() == max(runner.batches) * max(runner.queries) * vocab * 4
    steps = [[("decode", 1), ("verify", 2), ("rollback", 3)], [("verify", 3), ("decode", 1), ("decode", 1)],
             [("rollback", 2), ("verify", 1), ("verify", 3)]]
    assert_same_rows(eager, static, GRAPHS, [5, 12, 3], steps, 7, N_POSITIONS, SAME)
    assert len(replays) >= len(steps)


class FakeCuda:
    """A fake of the torch.cuda calls `ModelRunner._capture_all` makes (this machine has no GPU):
    a graph's capture records which bucket it held and on which stream, memory_reserved reads a
    falling figure, and the capture of bucket `fail_at` raises as a failed capture does. What it
    checks is the capture code's own course, which CPU tests otherwise never run."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.capturing = False
        self.current: object = None  # the stream work goes to now (torch.cuda.stream's context)
        self.devices: list[object] = []  # each torch.cuda.device guard's device
        self.captures: list[object] = []  # the stream of each capture
        self.reserved = 10**9
        self.emptied = 0
        self.fail_at = fail_at
        fake = self

        class Stream:
            def wait_stream(self, other: object) -> None:
                pass

        class Graph:
            def replay(self) -> None:
                pass

        class graph:  # noqa: N801 (torch.cuda.graph's name)
            def __init__(self, g: object, pool: object = None, stream: object = None) -> None:
                self.stream = stream

            def __enter__(self) -> None:
                if len(fake.captures) == fake.fail_at:
                    raise RuntimeError("operation not permitted when stream is capturing")
                fake.capturing, fake.current = True, self.stream  # (a capture runs on its stream)
                fake.captures.append(self.stream)

            def __exit__(self, *exc: object) -> None:
                fake.capturing, fake.current = False, None

        self.Stream, self.CUDAGraph, self.graph = Stream, Graph, graph

    def install(self, monkeypatch) -> None:
        import contextlib

        @contextlib.contextmanager
        def stream(s: object):  # type: ignore[no-untyped-def]
            before, self.current = self.current, s
            yield
            self.current = before

        @contextlib.contextmanager
        def device(d: object):  # type: ignore[no-untyped-def]
            self.devices.append(d)
            yield

        for name, value in {"Stream": self.Stream, "CUDAGraph": self.CUDAGraph, "graph": self.graph,
                            "synchronize": lambda *a: None, "graph_pool_handle": lambda: object(),
                            "stream": stream, "current_stream": lambda *a: self.Stream(),
                            "device": device, "empty_cache": self._empty,
                            "memory_reserved": self._reserved}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def _empty(self) -> None:
        self.emptied += 1

    def _reserved(self, *a: object) -> int:
        self.reserved -= 1000  # the capture released more than the graphs took
        return self.reserved


def test_the_capture_warms_each_bucket_up_and_records_it_on_the_runner_s_own_stream(models, tokenizer, monkeypatch):
    _, static = pair(models["llama"], tokenizer)
    runner = static.runner
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    ran: list[tuple[tuple[int, int, int], bool, object]] = []
    step = runner._step
    monkeypatch.setattr(runner, "_step",
                        lambda *shape: ran.append((shape, cuda.capturing, cuda.current)) or step(*shape))
    runner.capture_graphs = True
    runner.capture()
    order, mine = runner.capture_order(), runner._capture_stream
    assert list(runner.graphs) == order and runner.execution == "cuda-graphs"
    assert mine is not None and cuda.devices == [runner.device]  # under a guard of the runner's device
    # every capture on one stream, the runner's own (not torch.cuda.graph's process-wide default)
    assert len(cuda.captures) == len(order) and all(s is mine for s in cuda.captures)
    # each bucket ran once outside a capture, on that stream, just before its capture (vLLM's and
    # SGLang's warm-up); the first run is the probe of the logits' width, there too
    assert ran[0][2] is mine
    assert ran[1:] == [x for shape in order for x in ((shape, False, mine), (shape, True, mine))]
    assert cuda.emptied == 1 and runner.graph_memory == 0  # released first; never below 0


def test_a_failed_capture_runs_every_step_eagerly_and_says_so(models, tokenizer, monkeypatch):
    """Under --torch-compile too: Info says "eager", not "compiled", when the capture failed."""
    _, static = pair(models["llama"], tokenizer)
    runner = static.runner
    FakeCuda(fail_at=3).install(monkeypatch)
    runner.capture_graphs, runner.compile = True, True  # as with --torch-compile: its compiled step
    runner._step = lambda *shape: runner._static_forward(*shape)
    runner.capture()
    assert runner.graphs == {} and runner.execution == "eager" and runner._step == runner._static_forward
    assert runner.bucket(StepBatch([BlockTable(blocks=[1], length=3)], [3], [[5]], 1)) is None  # eager


@pytest.mark.slow
def test_the_static_path_gives_eager_s_greedy_tokens_in_bfloat16_over_64_steps():
    """Issue 15's bfloat16 check, on the CPU: the demo base-large in bfloat16, the static path
    (what a capture records, run eagerly here) against the eager one, the same 64 greedy tokens
    from each prompt, every decode step static. test_runner_cuda.py checks the captured steps
    the same way on a GPU."""
    model, tok, _ = load_model(str(DEMO / "base-large"), role="t", dtype="bfloat16")
    kw = dict(model_id="t", role="t", kv_cache_tokens=4096, kv_block_size=16, session_active_s=0.0)
    eager = ModelEngine(model, tok, graphs=GraphConfig(mode="off"), **kw)
    static = ModelEngine(model, tok, graphs=GraphConfig(mode="static", max_batch=8, max_query=4, max_context=128), **kw)
    for text in GREEDY_PROMPTS:
        prompt = tok(text).input_ids
        before = static.runner.static_steps
        assert greedy_tokens(eager, prompt, 64) == greedy_tokens(static, prompt, 64), text
        assert static.runner.static_steps - before >= 64


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_the_static_path_follows_eager_in_bfloat16_on_a_random_llama(tokenizer, kv):
    """The GQA Llama (random weights) in bfloat16, both paths fed the same tokens: every
    log-probability within 0.5 of eager's over 64 decode steps (measured here: 0.09 with the
    model's own cache, 0.16 over an fp8 one; a wrong position or cache slot moves them by whole
    units). Its greedy tokens are no check: they part at near-ties."""
    model = graph_llama(len(tokenizer)).to(torch.bfloat16)
    kw = dict(model_id="t", role="t", kv_cache_tokens=4096, kv_block_size=16, session_active_s=0.0, kv_cache_dtype=kv)
    eager = ModelEngine(model, tokenizer, graphs=GraphConfig(mode="off"), **kw)
    static = ModelEngine(model, tokenizer, graphs=GraphConfig(mode="static", max_batch=8, max_query=4, max_context=128),
                         **kw)
    assert forced_worst_gap(eager, static, [1, 2, 3, 4], 64) < 0.5
    assert static.runner.static_steps >= 64


def test_the_cache_goes_by_the_keyword_the_model_s_forward_takes(models):
    # transformers 5.24 renamed past_key_values to cache; a forward with **kwargs would drop
    # the wrong name silently and run without the paged cache
    assert cache_argument(models["gpt2"]) == "cache" and cache_argument(models["llama"]) == "cache"

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    class NoCache(torch.nn.Module):
        def forward(self, input_ids=None, **kwargs):
            return None

    assert cache_argument(Older()) == "past_key_values"
    with pytest.raises(ValueError, match="takes no cache"):
        cache_argument(NoCache())


def test_bad_graph_settings_are_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--cuda-graphs"):
        GraphConfig(mode="sometimes")
    with pytest.raises(ValueError, match="--cuda-graph-max-batch"):
        GraphConfig(max_batch=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.integers(1, 20), min_size=1, max_size=11), steps=st.lists(step, min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_static_steps_equal_eager_ones_over_random_batches(models, tokenizer, arch, prompts, steps, seed):
    eager, static = pair(models[arch], tokenizer)
    assert_same_rows(eager, static, GRAPHS, prompts, steps, seed, N_POSITIONS, SAME)


def test_static_drafts_equal_eager_ones_and_long_contexts_fall_back_to_eager(models, tokenizer):
    eager, static = pair(models["llama"], tokenizer)
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(3)
    # the third prompt outgrows the largest context bucket (64): its forwards run eagerly
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 17, 70)]
    greedy, sampled = SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.9, top_p=0.9)
    items = [DraftItem(f"d{i}", 0, p, 3, greedy if i % 2 == 0 else sampled, seed=i) for i, p in enumerate(prompts)]
    for batch in (items[:2], items[2:]):  # short contexts (static), then the long one alone (eager)
        want, got = eager.draft_batch(batch), static.draft_batch(batch)
        for w, r in zip(want, got):
            assert w.error is None and r.error is None
            assert w.drafts == r.drafts
            assert (w.rows - r.rows).abs().max().item() <= SAME
    assert static.runner.static_steps >= 3 and static.runner.eager_steps >= 4  # 3 drafts; 1 prefill + 3 drafts


def test_rows_come_back_floored_so_the_combiner_can_mix_them_as_they_are(models, tokenizer):
    from eftmesh.core.mixing import LOGPROB_FLOOR

    _, static = pair(models["gpt2"], tokenizer)
    with torch.no_grad():
        head = static.model.get_output_embeddings()
        saved = head.weight[5].clone()
        head.weight[5] = -1e6  # one token's logit falls far below the rest
    try:
        r = static.score_batch([ScoreItem("f", 0, [1, 2, 3], 1)])[0]
    finally:
        with torch.no_grad():
            head.weight[5] = saved
    row = r.rows[0, :len(tokenizer)]
    assert torch.isfinite(row).all()
    assert (row.max() - row.min()).item() <= -LOGPROB_FLOOR + 1e-3
