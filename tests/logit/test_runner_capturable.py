"""What a CUDA graph captures stays on the device, checked on every CI run without a GPU.

The runner's static forward (`ModelRunner._static_forward`) is the body a CUDA graph records.
A capture fails, or the replayed step stalls, if that body syncs with the host (`.item()`,
`.tolist()`, `bool(t)`, `nonzero`: data the host must wait for) or reads a host tensor (a
pageable copy inside the step). The GPU test (test_runner_cuda.py) catches both with
`torch.cuda.set_sync_debug_mode("error")`, but only where a GPU is. Here the same body runs on
the meta device, where tensors have shapes and no data: a data-dependent host read raises, and
a dispatch mode records every op and fails on any that reads or makes a CPU tensor (0-dim
scalars aside: those are arguments, not copies). A model or transformers version that brings a
host sync into the step fails here, for the tiny test models and for the real-shape family's
own configs (bench/real-shapes: a 1B Llama and SmolLM2-135M, which cost nothing on meta).
The whole static step (staging, the copy, the forward) is checked to move data between host
and device in one op, the staged buffer's copy.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaForCausalLM

from eftmesh.logit.kvcache import BlockTable, PagedKVPool
from eftmesh.logit.buckets import GraphConfig
from eftmesh.logit.runner import ModelRunner, StepBatch
from eftmesh_lab import real_shapes
from tiny_models import tiny_models

META = torch.device("meta")
GRAPHS = GraphConfig(mode="static", max_batch=4, max_query=4, max_context=128)
# (batch, query, context) buckets: a decode step, verifies of several k, the second context bucket
SHAPES = [(1, 1, 64), (2, 4, 64), (4, 2, 128), (3, 1, 128)]


class HostTraffic(TorchDispatchMode):
    """Records every aten op; each one that reads or makes a host tensor (`host`); and each one
    that moves data between the host and the device, a host tensor and a device one in the same
    op (`transfers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host: list[str] = []
        self.transfers: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in ins):
            self.host.append(f"{func} reads a host tensor")
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in outs):
            self.host.append(f"{func} makes a host tensor")
        kinds = {t.device.type for t in ins + outs if t.device.type != "cpu" or t.dim() > 0}
        if {"cpu", "meta"} <= kinds:
            self.transfers.append(str(func))
        return out


def meta_runner(model: torch.nn.Module, vocab: int, model_impl: str = "auto") -> ModelRunner:
    model = model.to(META).eval()
    pool = PagedKVPool(2048, 16, model.config.num_hidden_layers, META, next(model.parameters()).dtype)
    return ModelRunner(model, pool, max_context=256, graphs=GRAPHS, sharded=False, floor_limit=vocab,
                       model_impl=model_impl)


def captured_body(runner: ModelRunner, shape: tuple[int, int, int]) -> HostTraffic:
    """Run the static forward of one bucket on meta; returns what it did."""
    watch = HostTraffic()
    with torch.inference_mode(), watch:
        out = runner._static_forward(*shape)
    b, q, _ = shape
    assert out.device == META and tuple(out.shape[:2]) == (b, q)
    return watch


@pytest.fixture(scope="module")
def runners() -> dict[str, ModelRunner]:
    made = {}
    for name, m in tiny_models(512, 256, seed=0).items():  # both forwards over the same weights
        made[name] = meta_runner(m, 512)
        made[f"{name}/transformers"] = meta_runner(m, 512, "transformers")
    for part, config in (("base-large", "base-large.json"), ("small", "small.json")):
        with torch.device(META):
            model = LlamaForCausalLM(real_shapes.load_config(config))
        made[part] = meta_runner(model, real_shapes.VOCAB)
        made[f"{part}/transformers"] = meta_runner(model, real_shapes.VOCAB, "transformers")
    for r in made.values():  # the first step allocates the pool's layers
        with torch.inference_mode():
            r._static_forward(1, 1, 64)
    return made


@pytest.mark.parametrize("name", ["gpt2", "llama", "base-large", "small", "gpt2/transformers",
                                  "llama/transformers", "base-large/transformers"])
def test_the_captured_step_makes_no_host_sync_and_reads_no_host_tensor(runners, name):
    for shape in SHAPES:
        watch = captured_body(runners[name], shape)
        assert watch.ops > 50  # the whole forward went through the mode
        assert watch.host == [], f"{name} {shape}: {watch.host[:5]}"


def test_a_static_step_moves_its_inputs_to_the_device_in_one_copy(runners):
    """Issue 15's "inputs staged in pinned host memory and copied once": the whole static step
    (`ModelRunner.forward`: staging, the copy, the forward) reads the host in exactly one op,
    the copy of the staged buffer (on a GPU, one non-blocking copy from pinned memory), for a
    decode step and a verify alike (the staging before it is host work, the logits stay on the
    device). The eager path, for contrast, copies ids, positions, mask, slots and kept columns
    one by one."""
    runner = runners["llama"]
    tables = [BlockTable(blocks=[1, 2, 3], length=40), BlockTable(blocks=[4, 5], length=20)]
    decode = StepBatch(tables, [40, 20], [[7], [9]], 1)
    verify = StepBatch(tables, [40, 20], [[7, 8, 9, 10], [9, 3, 4, 5]], 4)  # k = 3
    for batch in (decode, verify):
        assert runner.bucket(batch) is not None, "the batch fits a static bucket"
        watch = HostTraffic()
        with torch.inference_mode(), watch:
            out = runner.forward(batch)
        assert tuple(out.shape[:2]) == (2, batch.keep)
        assert watch.transfers == ["aten.copy_.default"], watch.transfers
    eager = HostTraffic()
    # (its last op copies the logits to the host, which meta cannot: no data)
    with torch.inference_mode(), eager, pytest.raises(NotImplementedError, match="meta"):
        runner._eager(decode)
    assert len(eager.transfers) >= 5, eager.transfers  # what the static path saves


def test_the_check_fails_on_a_host_sync_and_on_a_host_tensor(runners, monkeypatch):
    """The check can fail: a step that reads a value back (a host sync on a GPU) raises on meta,
    and a step that mixes in a host-built tensor (a pageable copy on a GPU) is reported."""
    runner = runners["llama"]
    # the rotary embedding: a module both forwards call (transformers' and native.py's)
    rotary = runner.model.model.rotary_emb
    real = type(rotary).forward

    def syncs(self: Any, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if x.abs().max().item() > 1e9:  # data-dependent control flow
            return x, x
        return real(self, x, position_ids, *args, **kw)

    monkeypatch.setattr(type(rotary), "forward", syncs)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        captured_body(runner, (1, 1, 64))

    def host_tensor(self: Any, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kw: Any) -> Any:
        cos, sin = real(self, x, position_ids, *args, **kw)
        return cos + torch.zeros(cos.shape[-1]).to(x.device), sin  # built on the host, copied in

    monkeypatch.setattr(type(rotary), "forward", host_tensor)
    watch = captured_body(runner, (1, 1, 64))
    assert any("host tensor" in h for h in watch.host)


@pytest.mark.parametrize("name", ["gpt2", "llama", "base-large", "small"])
def test_the_native_step_dispatches_no_more_ops_than_transformers(runners, name):
    """--model-impl native runs transformers' ops, so it dispatches no more of them per decode
    step (each a kernel on a GPU): 1,050 against 1,081 for the 1B Llama shape, 126 against 153
    for the tiny GPT-2. What it saves is the Python around them (module calls, hooks,
    decorators, keyword plumbing, output records), which this count does not see."""
    ours = captured_body(runners[name], (1, 1, 64)).ops
    theirs = captured_body(runners[f"{name}/transformers"], (1, 1, 64)).ops
    print(f"{name}: {ours} aten ops per decode step natively, {theirs} through transformers")
    assert ours <= theirs
