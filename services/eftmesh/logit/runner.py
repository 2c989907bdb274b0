"""The forward pass of a logit service: its inputs, its static buffers and its CUDA graphs.

The engine (engine.py) owns sessions, admission and batching and hands the runner one
`StepBatch` per forward: rows that each append `new[b]` tokens to a session holding
`past[b]`, with its block table. The runner returns the last `keep` columns' logits of every
row, on the CPU, in one copy.

The model call itself is eftmesh's own forward of the architecture where it has one
(native.py, `--model-impl`: GPT-2 and Llama, bitwise equal to transformers'), transformers'
otherwise; both paths below take either.

Two paths:

- eager: the shapes of the batch as they are; host-built indices and mask, copied to the
  device. Prefills and everything outside the captured buckets take it.
- static: rows padded to a batch bucket, query columns to a query bucket (decode: 1; a
  verify of k drafts: k + 1, rounded up) and the gathered context to a context bucket, so
  that one bucket always runs the same shapes at the same addresses. The host writes ids,
  past and new lengths and block tables into one pinned buffer, copied to the device in one
  non-blocking copy; slots, positions and the attention mask are derived on the device from
  them; the logits come back in one copy, the step's one host sync. On CUDA each bucket is
  captured once at warm-up as a CUDA graph and replayed (vLLM and SGLang's design: a decode
  step of a small model is host-bound, ~600 kernel launches dispatched from Python each
  step; a replay is one launch). Without a GPU the same static path runs eagerly
  (`--cuda-graphs static`), which is how CI checks that it equals the eager one.
- compiled (`--torch-compile`): the static forward compiled by torch.compile at warm-up, then
  captured on CUDA; on a CPU it runs as compiled C++, without the per-op Python that bounds a
  small model's step there.

Attention over the paged pool: PyTorch's SDPA has no paged form, so each layer gathers the
batch's keys and values into a static [rows, context bucket] view (one `index_select`) and
masks what lies past each row's length. The gather reads bucket-sized context, so context
buckets are powers of two: at most 2x the context actually held.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from eftmesh.core.mixing import floor_rows_
from eftmesh.logit.buckets import GraphConfig, batch_buckets, bucket_for, pow2_buckets
from eftmesh.logit.kvcache import BatchView, BlockTable, PagedKVPool
from eftmesh.logit.native import native_forward

log = logging.getLogger(__name__)

@dataclass
class StepBatch:
    """One forward: row b appends `ids[b]` (len new[b] >= 1) to a session of `past[b]` tokens."""

    tables: list[BlockTable]
    past: list[int]
    ids: list[list[int]]
    keep: int  # logits wanted for the last `keep` query columns of every row (<= min new)

    @property
    def new(self) -> list[int]:
        return [len(x) for x in self.ids]


def cache_argument(model: Any) -> str:
    """The keyword the model's forward takes its cache by: `cache` since transformers 5.24
    (which renamed it), `past_key_values` before. A forward that takes **kwargs would drop the
    other name silently and run without the paged cache, so it is looked up, never assumed."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes no cache (neither `cache` nor `past_key_values`): "
                     "eftmesh serves transformers causal LMs with a KV cache")


class StaticView(Cache):
    """The `Cache` a static-shaped forward sees: `BatchView.update` over indices that live on
    the device (built there from the block tables), with no host-side state per step."""

    def __init__(self, pool: PagedKVPool, write_idx: torch.Tensor, read_idx: torch.Tensor, rows: int, n: int,
                 length: int) -> None:
        super().__init__(layers=[])
        self.pool, self.write_idx, self.read_idx = pool, write_idx, read_idx
        self.rows, self.n, self.length = rows, n, length

    update = BatchView.update

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - self.n

    @property
    def is_compileable(self) -> bool:
        return False


class ModelRunner:
    """Owns one model's forward: `forward(batch)` -> [rows, keep, vocab] logits on the CPU."""

    def __init__(self, model: Any, pool: PagedKVPool, *, max_context: int, graphs: GraphConfig,
                 sharded: bool, floor_limit: int | None = None, model_impl: str = "auto") -> None:
        self.model = model
        self._cache_arg = cache_argument(model)
        # --model-impl: our forward of the model's architecture (native.py), else transformers'
        self.native = native_forward(model, model_impl, sharded=sharded)
        # Rows are floored (core.mixing.floor_rows_) over the tokenizer's columns on the device,
        # so that the combiner mixes them as they come (ScoreBatchResponse.floored).
        self.floor_limit = floor_limit
        self.pool = pool
        self.max_context = max_context
        self.device = model.get_input_embeddings().weight.device
        # logits_to_keep indexes the final hidden states, on the device of the base model's last
        # weights (its final norm), before the head
        self._keep_device = list(model.base_model.parameters())[-1].device
        self.dtype = next(model.parameters()).dtype
        on_cuda = self.device.type == "cuda" and not sharded
        if sharded and (graphs.mode == "static" or graphs.compile):
            raise ValueError("--cuda-graphs static and --torch-compile need the model on one device (no --device-map)")
        self.static = graphs.mode == "static" or graphs.compile or (graphs.mode == "auto" and on_cuda)
        self.capture_graphs = graphs.mode == "auto" and on_cuda
        # The static forward, compiled (--torch-compile) or not. Dynamic shapes: one compile
        # serves every context bucket, and batch and query buckets past 1 (torch.compile
        # specialises sizes 0 and 1), so warm-up compiles at most four graphs (compile_static).
        self.compile, self._mode = graphs.compile, graphs.mode
        self._step = self._static_forward  # compiled by compile_static, once the pool is allocated
        self.compiles = 0  # graphs torch.compile made
        self.compile_s = 0.0
        self._warm = False  # warm-up done: a compile after it is logged
        bs = pool.block_size
        ctx = min(graphs.max_context, max_context)
        self.batches = batch_buckets(graphs.max_batch)
        self.queries = pow2_buckets(graphs.max_query)
        # context buckets are whole blocks: a row's block table is read in whole blocks
        self.contexts = sorted({-(-c // bs) * bs for c in pow2_buckets(ctx, lowest=min(ctx, max(64, bs)))})
        # (batch, query, context) -> (replay, the logits it writes: a view of one buffer all share)
        self.graphs: dict[tuple[int, int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.graph_memory = 0  # device bytes the capture kept (its pool and the shared output)
        self._capture_stream: Any = None  # where the graphs were warmed up and captured (_capture_all)
        self.capture_s = 0.0
        self.static_steps = self.eager_steps = 0
        if self.static:
            most = max(self.batches) * (max(self.queries) + 2 + max(self.contexts) // bs)
            pin = self.device.type == "cuda"
            self._host_in = torch.zeros(most, dtype=torch.long, pin_memory=pin)  # staged inputs
            self._dev_in = torch.zeros(most, dtype=torch.long, device=self.device)  # what steps read
            self._arange = torch.arange(max(max(self.contexts), max(self.queries)), device=self.device)
            self._host_out: torch.Tensor | None = None  # pinned logits, sized at the first step

    # --- choosing a path ---------------------------------------------------------------------------

    def bucket(self, batch: StepBatch) -> tuple[int, int, int] | None:
        """(batch, query, context) bucket of a batch the static path takes; None: eager."""
        if not self.static:
            return None
        q = bucket_for(max(batch.new), self.queries)
        b = bucket_for(len(batch.ids), self.batches)
        if q is None or b is None or batch.keep > q:
            return None
        # the gathered context holds each row's past and every query column, padding included
        c = bucket_for(max(p + q for p in batch.past), self.contexts)
        return None if c is None else (b, q, c)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run one forward; returns [rows, keep, vocab] logits (model dtype) on the CPU."""
        shape = self.bucket(batch)
        if shape is None:
            self.eager_steps += 1
            return self._eager(batch)
        self.static_steps += 1
        return self._static(batch, *shape)

    # --- eager ----------------------------------------------------------------------------------------

    def _eager(self, batch: StepBatch) -> torch.Tensor:
        new = batch.new
        n, keep = max(new), batch.keep
        view = BatchView(self.pool, batch.tables, batch.past, new, n)
        flat: list[int] = []  # one list, one tensor (a tensor per row costs ~10 us each)
        for row in batch.ids:
            flat += row
            flat += [0] * (n - len(row))
        ids = torch.tensor(flat, dtype=torch.long).view(len(new), n)  # [rows, n]; padding id 0
        # Each row keeps its last `keep` real query columns; the model projects only those.
        cols = torch.tensor(new)[:, None] - keep + torch.arange(keep)[None, :]  # [rows, keep]
        logits = self._call(ids.to(self.device), view.positions.clamp_max(self.max_context - 1).to(self.device),
                            view.attention_mask(self.dtype), view, cols.clamp_min(0).to(self._keep_device))
        return floor_rows_(logits, self.floor_limit).to("cpu")  # [rows, keep, vocab]

    def _call(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, view: Cache,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits [rows, keep or n, vocab] for query columns `keep` ([rows, keep];
        all when None): through our forward where there is one (native.py), else transformers'."""
        if self.native is not None:
            return self.native(ids, positions, mask, view, keep)
        extra = {} if keep is None else {"logits_to_keep": keep}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          **{self._cache_arg: view}, use_cache=True, **extra).logits

    # --- static ---------------------------------------------------------------------------------------

    def _layout(self, b: int, q: int, c: int) -> tuple[int, int, int, int]:
        """Offsets in the input buffer of a (b, q, c) step: ids [b, q] | past [b] | new [b] |
        block tables [b, c / block_size]; and its end."""
        past = b * q
        new = past + b
        table = new + b
        return past, new, table, table + b * (c // self.pool.block_size)

    def _stage(self, batch: StepBatch, b: int, q: int, c: int) -> int:
        """Write the step's inputs into the host buffer (padding rows: no tokens, scratch
        blocks); returns how many entries to copy. One flat Python list, one tensor built from
        it: per-row tensors cost ~10 us each, the whole of a 32-row step's staging otherwise."""
        width = c // self.pool.block_size
        pad_rows = b - len(batch.ids)
        flat: list[int] = []
        for row in batch.ids:
            flat += row
            flat += [0] * (q - len(row))
        flat += [0] * (pad_rows * q)
        flat += batch.past
        flat += [0] * pad_rows
        flat += batch.new
        flat += [0] * pad_rows
        for t in batch.tables:  # blocks past the bucket (room reserved for drafts) hold no position it reads
            blocks = t.blocks[:width]
            flat += blocks
            flat += [0] * (width - len(blocks))
        flat += [0] * (pad_rows * width)
        end = len(flat)
        self._host_in[:end] = torch.tensor(flat, dtype=torch.long)
        return end

    def _static_forward(self, b: int, q: int, c: int) -> torch.Tensor:
        """The forward of a (b, q, c) bucket over `_dev_in`: device ops only, no host sync, the
        same shapes and addresses every time (what a CUDA graph captures). Returns
        [b, q, vocab] logits of every query column."""
        bs = self.pool.block_size
        past_at, new_at, table_at, end = self._layout(b, q, c)
        inp = self._dev_in
        ids = inp[:past_at].view(b, q)  # [b, q]
        past, new = inp[past_at:new_at], inp[new_at:table_at]  # [b], [b]
        table = inp[table_at:end].view(b, c // bs)  # [b, c / bs]
        j = self._arange[:q]  # [q]
        cols = self._arange[:c]  # [c]
        positions = past[:, None] + j[None, :]  # [b, q]
        write_slot = table.gather(1, (positions // bs).clamp_max(c // bs - 1)) * bs + positions % bs
        write_slot = torch.where(j[None, :] < new[:, None], write_slot, 0)  # padding -> scratch slot 0
        read_slot = table[:, cols // bs] * bs + (cols % bs)[None, :]  # [b, c]
        read_slot = torch.where(cols[None, :] < (past + new)[:, None], read_slot, 0)
        # A query at position p sees every column <= p of its row (see BatchView): never a fully
        # masked row, so no NaN; padding queries and padding rows see scratch, and are dropped.
        allowed = cols[None, None, None, :] <= positions[:, None, :, None]  # [b, 1, q, c]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)
        view = StaticView(self.pool, write_slot.reshape(-1), read_slot.reshape(-1), b, q, c)
        logits = self._call(ids, positions.clamp_max(self.max_context - 1), mask, view)  # [b, q, vocab]
        if q > 1:  # each row's last q real columns (padding columns come after them)
            last = (new[:, None] - q + j[None, :]).clamp_min(0)  # [b, q]
            logits = logits.gather(1, last[:, :, None].expand(-1, -1, logits.shape[-1]))
        return floor_rows_(logits, self.floor_limit)  # [b, q, vocab]

    def _static(self, batch: StepBatch, b: int, q: int, c: int) -> torch.Tensor:
        n = self._stage(batch, b, q, c)
        self._dev_in[:n].copy_(self._host_in[:n], non_blocking=True)
        graph = self.graphs.get((b, q, c))
        if graph is not None:
            graph[0]()  # replay: the bucket's logits land in graph[1]
            logits = graph[1]
        else:
            logits = self._step(b, q, c)
        rows, keep = len(batch.ids), batch.keep
        # each row's last `keep` real columns: the static forward kept its last q
        want = logits[:rows, q - keep:]  # [rows, keep, vocab]
        if self.device.type != "cuda":  # a new tensor each uncaptured step; a replay's is reused
            return want if graph is None else want.clone()
        # One pinned copy back and one wait: the step's only host sync.
        out = self._pinned_out(want.shape, want.dtype)
        out.copy_(want, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()
        return out.clone()  # the pinned buffer is reused by the next step

    def _pinned_out(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n = shape.numel()
        if self._host_out is None or self._host_out.numel() < n or self._host_out.dtype != dtype:
            most = max(self.batches) * max(self.queries) * shape[-1]
            self._host_out = torch.empty(max(most, n), dtype=dtype, pin_memory=True)
        return self._host_out[:n].view(shape)

    # --- capture --------------------------------------------------------------------------------------

    @property
    def model_impl(self) -> str:
        """Whose forward runs the model (LogitServiceInfo.model_impl): "native" or "transformers"."""
        return "transformers" if self.native is None else "native"

    @property
    def execution(self) -> str:
        """How steps run now (LogitServiceInfo.execution): "cuda-graphs" or "compiled+cuda-graphs"
        (replayed), "compiled" or "static" (static shapes, run as they come), or "eager"."""
        if self.graphs:
            return "compiled+cuda-graphs" if self.compile else "cuda-graphs"
        return "compiled" if self.compile else "static" if self.static else "eager"

    # --- torch.compile ----------------------------------------------------------------------------

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """torch.compile's backend: inductor, counting what it compiles. A compile once warm-up
        is over is a shape the warm-up did not cover: it stalls a step for as long as a compile
        takes, so it is logged."""
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        if self._warm:
            log.warning("torch.compile compiled the static forward again while serving (graph %d): a "
                        "specialisation warm-up did not cover; this step waited for it", self.compiles)
        return compile_fx(gm, example_inputs)

    def compile_static(self) -> float:
        """Compile the static forward for every specialisation serving can meet: batch and query
        buckets of 1 and past 1 (each pair), at the smallest context. Returns the seconds it
        took. A compile that fails (no C++ compiler for a CPU, no Triton for a GPU) does not stop
        the service: the error is logged and steps run uncompiled, as without --torch-compile."""
        if not self.compile:
            return 0.0
        started = time.perf_counter()
        batches = sorted({self.batches[0], self.batches[-1]})
        queries = sorted({self.queries[0], self.queries[-1]})
        self._dev_in.zero_()  # every row padding: writes land in the scratch block
        try:
            with torch.inference_mode():
                self._static_forward(batches[0], queries[0], self.contexts[0])  # the pool's layers allocated
                # torch.compile keeps its graphs per code object, for every runner in the process,
                # up to recompile_limit (8) before it falls back to eager: room for a few runners
                # (tests, the in-process mesh), each with its four specialisations.
                dynamo = torch._dynamo.config
                dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
                dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
                self._step = torch.compile(self._static_forward, dynamic=True, backend=self._inductor)
                for b in batches:
                    for q in queries:
                        self._step(b, q, self.contexts[0])
        except Exception:
            log.exception("torch.compile failed: steps run uncompiled (drop --torch-compile to skip it)")
            self.compile, self._step = False, self._static_forward
            self.static = self._mode == "static" or self.capture_graphs
        self.compile_s = time.perf_counter() - started
        if self.compile:
            log.info("torch.compile: %d graphs of the static forward (batch %s x query %s) in %.1f s",
                     self.compiles, batches, queries, self.compile_s)
        return self.compile_s

    def capture(self) -> float:
        """Capture every (batch, query, context) bucket as a CUDA graph (largest first, all in
        one memory pool); returns the seconds it took. A no-op unless graphs are on.

        A capture that fails (out of memory, an op in the model's code that a graph cannot
        hold) does not stop the service: the error is logged with its traceback and every step
        then runs eagerly, as TGI does when its CUDA graph warm-up fails; Info says "eager". An
        error the device keeps (a sticky CUDA error) still fails the start, at the sync after."""
        self._warm = True  # a compile from here on is logged
        if not self.capture_graphs:
            return 0.0
        started = time.perf_counter()
        try:
            self._capture_all()
        except Exception:
            log.exception("CUDA graph capture failed after %d of %d buckets: every step runs eagerly "
                          "(--cuda-graphs off skips the capture)", len(self.graphs),
                          len(self.batches) * len(self.queries) * len(self.contexts))
            self.graphs.clear()
            self.graph_memory = 0
            self.static = self.capture_graphs = False
            self.compile, self._step = False, self._static_forward  # Info says "eager", as it is
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - started
        if self.graphs:
            log.info("captured %d CUDA graphs (batch %s x query %s x context %s) in %.1f s, keeping %.0f MiB",
                     len(self.graphs), self.batches, self.queries, self.contexts, self.capture_s,
                     self.graph_memory / 2**20)
        return self.capture_s

    def _capture_all(self) -> None:
        """Warm every bucket up, then capture it, on a stream of this runner's own, as vLLM and
        SGLang warm each size before its capture: a first use's lazy initialisation (a kernel's
        load, a cuBLAS workspace) happens outside any capture. torch.cuda.graph's default stream is
        one for the whole process, so every engine's graphs would share its cuBLAS workspace,
        which freeing one engine's graphs can release under the others' (pytorch#193402); here
        each runner's graphs use their own stream's. (torch hands out streams from a pool of 32
        per device in turn: own streams for the first 32 runners of a process, more than a
        logit service holds.)"""
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            pool = torch.cuda.graph_pool_handle()
            stream = self._capture_stream = torch.cuda.Stream()

            def record(body: Callable[[], None]) -> Callable[[], None]:
                with torch.cuda.stream(stream):
                    body()  # the warm-up run, outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    body()
                return graph.replay

            self._dev_in.zero_()  # every row padding: writes land in the scratch block
            with torch.inference_mode():
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    probe = self._step(*self.capture_order()[-1])  # the logits' width and dtype
                vocab, dtype = probe.shape[-1], probe.dtype
                del probe
                # what the warm-up freed goes back to the device first, so that the difference
                # is what the graphs keep (capture would release it at its start, and the pool
                # take it again: the difference then read ~0, or below)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                before = torch.cuda.memory_reserved()
                self._record_all(record, vocab, dtype)
                torch.cuda.current_stream().wait_stream(stream)
                self.graph_memory = max(torch.cuda.memory_reserved() - before, 0)

    def capture_order(self) -> list[tuple[int, int, int]]:
        """Every (batch, query, context) bucket, largest first."""
        return sorted(((b, q, c) for b in self.batches for q in self.queries for c in self.contexts),
                      key=lambda s: (s[0] * s[1] * s[2], s), reverse=True)

    def _record_all(self, record: Callable[[Callable[[], None]], Callable[[], None]], vocab: int,
                    dtype: torch.dtype) -> None:
        """Record every bucket's step with `record` (a CUDA graph capture; a fake in CPU tests),
        largest first, each ending in a copy of its logits into one output buffer that every
        graph shares. The step's own logits are then freed when its capture ends, so the graphs'
        shared pool reuses them (and every other intermediate) for the next, smaller bucket: the
        pool holds about one largest step's activations, not one [b, q, vocab] output per
        bucket (196 by default; ~0.9 GB in bfloat16 at a 49k vocabulary). vLLM and SGLang keep
        their graphs' outputs the same way; replays run one at a time, under the engine's lock."""
        out = torch.empty(max(self.batches) * max(self.queries) * vocab, dtype=dtype, device=self.device)
        for b, q, c in self.capture_order():
            logits = out[: b * q * vocab].view(b, q, vocab)  # contiguous: one plain copy back per step

            def body(b: int = b, q: int = q, c: int = c, logits: torch.Tensor = logits) -> None:
                logits.copy_(self._step(b, q, c))

            self.graphs[(b, q, c)] = (record(body), logits)
