"""--device-map: loading straight onto the devices, the KV pool following the layers' devices.

CPU only. No second device exists here, so a model really split over two devices (and the pool
allocating on each) is untested; the per-layer placement, the per-device index and mask
caching and the mask swap are tested with every device being the CPU or with `meta` tensors.
"""

from __future__ import annotations

import json

import pytest
import torch

from eftmesh.logit.engine import ModelEngine, ScoreItem
from eftmesh.logit.placement import parse_device_map, parse_max_memory
from eftmesh.logit.kvcache import BatchView, BlockTable, PagedKVPool
from eftmesh.logit.server import parse_args

TOKENS = [5, 9, 2, 7, 11, 3]


def _scores(engine: ModelEngine) -> torch.Tensor:
    rows, _ = engine.score("s", 0, TOKENS, len(TOKENS))
    step, _ = engine.score("s", len(TOKENS), [4], 1)
    batch = engine.score_batch([ScoreItem("a", 0, TOKENS[:3], 2), ScoreItem("b", 0, TOKENS, 1)])
    return torch.cat([rows, step, *(torch.log_softmax(r.rows.float(), -1) for r in batch)])


@pytest.fixture(scope="module")
def reference(tiny_family) -> torch.Tensor:
    return _scores(ModelEngine.from_pretrained(str(tiny_family["base-large"]), role="r", kv_cache_tokens=256))


def _module_map(path) -> dict[str, str]:
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    return {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
            **{f"transformer.h.{i}": "cpu" for i in range(layers)}, "transformer.ln_f": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("kind", ["json", "auto"])
def test_device_map_scores_match_and_loads_in_place(tiny_family, reference, kind, monkeypatch):
    path = str(tiny_family["base-large"])
    device_map = parse_device_map(json.dumps(_module_map(path)) if kind == "json" else "auto")
    moved = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        moved.append(type(self).__name__)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    engine = ModelEngine.from_pretrained(path, role="r", device_map=device_map, kv_cache_tokens=256)
    # the weights were placed while loading: nothing moved the whole model afterwards
    assert not [name for name in moved if name.endswith("LMHeadModel")], moved
    assert engine.info.device == "cpu" and engine.device == torch.device("cpu")
    torch.testing.assert_close(_scores(engine), reference, atol=1e-5, rtol=0)
    assert engine.pool.devices() == [torch.device("cpu")]
    assert all(t is not None and t.device.type == "cpu" for t in engine.pool.kv)


def test_single_device_loads_in_place(tiny_family, monkeypatch):
    moved = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(type(self).__name__) or real_to(self, *a, **k))
    engine = ModelEngine.from_pretrained(str(tiny_family["base-large"]), role="r", device="cpu", kv_cache_tokens=256)
    assert not [name for name in moved if name.endswith("LMHeadModel")], moved
    assert engine.info.device == "cpu"


def test_pool_allocates_each_layer_where_its_keys_arrive():
    pool = PagedKVPool(64, 16, layers=3, device=torch.device("cpu"), dtype=torch.float32)
    table = BlockTable()
    pool.reserve(table, 2)
    view = BatchView(pool, [table], past=[0], new=[2], n=2)
    k = torch.randn(1, 2, 2, 4)
    view.update(k, k, 0)
    assert pool.kv[1] is None and pool.kv[2] is None  # lazily, per layer
    assert pool.nbytes() == pool.kv[0].untyped_storage().nbytes()
    # a layer whose keys arrive on another device gets its cache there (meta: shapes only)
    meta = torch.empty(1, 2, 2, 4, device="meta")
    keys, _ = view.update(meta, meta, 1)
    assert pool.kv[1].device.type == "meta" and keys.device.type == "meta"
    assert pool.devices() == [torch.device("cpu"), torch.device("meta")]
    # the indices went to meta once for this forward, and stay on the pool's device for the rest
    assert set(view._idx) == {torch.device("cpu"), torch.device("meta")}
    assert view.write_idx.device.type == "cpu"
    with pytest.raises(ValueError, match="kv heads"):
        view.update(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), 2)


def test_mask_copied_once_per_device_per_forward():
    pool = PagedKVPool(64, 16, layers=2, device=torch.device("cpu"), dtype=torch.float32)
    table = BlockTable()
    pool.reserve(table, 3)
    view = BatchView(pool, [table], past=[0], new=[3], n=3)
    mask = view.attention_mask(torch.float32)
    assert view.mask_on(torch.device("cpu")) is mask
    on_meta = view.mask_on(torch.device("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == mask.shape
    assert view.mask_on(torch.device("meta")) is on_meta  # built once, shared by the device's layers


def test_mask_swapper_hands_each_module_its_devices_copy():
    from eftmesh.logit.placement import mask_swapper as _mask_swapper

    pool = PagedKVPool(64, 16, layers=1, device=torch.device("cpu"), dtype=torch.float32)
    table = BlockTable()
    pool.reserve(table, 2)
    view = BatchView(pool, [table], past=[0], new=[2], n=2)
    mask = view.attention_mask(torch.float32)
    hidden = torch.zeros(1)
    assert _mask_swapper(torch.device("cpu"))(None, (hidden, view, mask), {}) is None  # same device: untouched
    args, kwargs = _mask_swapper(torch.device("meta"))(None, (hidden, view), {"attention_mask": mask, "x": 1})
    assert args[0] is hidden and args[1] is view
    assert kwargs["attention_mask"] is view.mask_on(torch.device("meta")) and kwargs["x"] == 1
    args, _ = _mask_swapper(torch.device("meta"))(None, (hidden, view, mask), {})
    assert args[2].device.type == "meta"


def test_flags():
    cfg = parse_args(["--model", "m", "--role", "r"])
    assert cfg.device_map == "none" and parse_device_map(cfg.device_map) is None
    cfg = parse_args(["--model", "m", "--role", "r", "--device-map", "auto", "--max-memory", "0=70GiB,1=70GiB"])
    assert parse_device_map(cfg.device_map) == "auto"
    assert parse_max_memory(cfg.max_memory) == {0: "70GiB", 1: "70GiB"}
    assert parse_device_map('{"lm_head": 1}') == {"lm_head": 1}
    for bad in ("[1]", "{}", "cuda"):
        with pytest.raises(ValueError):
            parse_device_map(bad)
    with pytest.raises(ValueError):
        parse_max_memory("70GiB")


def test_max_memory_needs_a_device_map(tiny_family):
    with pytest.raises(ValueError, match="device-map"):
        ModelEngine.from_pretrained(str(tiny_family["base-large"]), role="r", max_memory={0: "1GiB"})


def test_spy_sees_the_move_without_accelerate(tiny_family, monkeypatch):
    """The spy above is meaningful: without accelerate the engine loads on the CPU and moves."""
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find(name, *a))
    moved = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(type(self).__name__) or real_to(self, *a, **k))
    ModelEngine.from_pretrained(str(tiny_family["base-large"]), role="r", device="cpu", kv_cache_tokens=256)
    assert "GPT2LMHeadModel" in moved
