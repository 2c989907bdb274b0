"""The GPU run's summary against issue 15's targets (eftmesh_lab.gpu_targets), on files shaped
like what bench/gpu.sh writes (made up here: the real ones come from a GPU)."""

from __future__ import annotations

import json

from eftmesh_lab import gpu_targets


def _load_doc(plain1: float, plain32: float, hf1: float) -> dict:
    return {"tokens_per_s": {"mesh-plain": {"1": plain1, "32": plain32}, "hf-generate": {"1": hf1, "32": 1.0}}}


def _engine_row(model: str, n1: float, n32: float, syncs: float, launches: float, captured: bool = True) -> dict:
    auto = {"execution": "cuda-graphs" if captured else "eager", "graph_capture_s": 4.2,
            "decode_ms": {"1": n1, "32": n32}}
    if captured:
        auto["profile_n1"] = {"host_syncs_per_step": syncs, "launches_per_step": launches}
    return {"model": model, "bandwidth_bound_ms": 0.45,
            "modes": {"off": {"execution": "eager", "decode_ms": {"1": 20.0, "32": 25.0}}, "auto": auto}}


def _by_target(doc: dict) -> dict[tuple[str, str], dict]:
    return {(r["family"], r["target"]): r for r in doc["targets"]}


def test_every_target_is_judged_from_the_run_s_files(tmp_path):
    (tmp_path / "load-gpu.json").write_text(json.dumps(_load_doc(250.0, 4000.0, 100.0)))
    (tmp_path / "load-gpu-real.json").write_text(json.dumps(_load_doc(140.0, 3500.0, 60.0)))
    (tmp_path / "engine-gpu.json").write_text(json.dumps({"results": [
        _engine_row("models/demo/base-large", 0.8, 1.1, 1, 9),
        _engine_row("build/real-shapes/base-large", 2.5, 6.5, 1, 24),
    ]}))
    gpu_targets.main(["--results", str(tmp_path)])
    doc = json.loads((tmp_path / "gpu-targets.json").read_text())
    t = _by_target(doc)
    assert len(t) == len(gpu_targets.TARGETS) == 9
    assert t["demo", "mesh plain, 1 stream"]["value"] == 250.0 and t["demo", "mesh plain, 1 stream"]["pass"] is True
    assert t["demo", "mesh plain 1 stream / hf-generate base-large 1 stream"]["value"] == 2.5
    assert t["demo", "mesh plain, 32 streams"]["pass"] is False  # 4,000 < 5,000
    assert t["real", "base-large captured decode step, N=1"]["value"] == 2.5  # the real shape's row, not the demo's
    assert t["real", "base-large captured decode step, N=32"]["pass"] is False  # 6.5 > 6
    assert t["real", "mesh plain, 1 stream"]["pass"] is False and t["real", "mesh plain, 32 streams"]["pass"] is True
    assert t["real", "host syncs per captured step"]["pass"] is True
    assert t["real", "CPU-side launches per captured step"]["value"] == 24 and \
        t["real", "CPU-side launches per captured step"]["pass"] is False
    assert doc["engine"]["real"]["bandwidth_bound_ms"] == 0.45 and doc["missing_files"] == []
    table = gpu_targets.markdown(doc)
    assert "| demo | mesh plain, 32 streams | 4000.00 tokens/s | >= 5000 tokens/s | **no** |" in table


def test_what_the_run_did_not_produce_is_not_measured_never_a_pass(tmp_path):
    # the capture failed (the engine ran eagerly) and the real-shape mesh never ran
    (tmp_path / "engine-gpu.json").write_text(json.dumps({"results": [
        _engine_row("build/real-shapes/base-large", 2.0, 3.0, 0, 1, captured=False)]}))
    doc = gpu_targets.evaluate(tmp_path)
    t = _by_target(doc)
    assert all(r["value"] is None and r["pass"] is None for r in doc["targets"])
    assert set(doc["missing_files"]) == {"load-gpu.json", "load-gpu-real.json"}
    assert doc["engine"]["real"]["execution"] == ["eager", "eager"]
    assert "not measured" in gpu_targets.markdown(doc) and t["real", "mesh plain, 1 stream"]["source"] == "load-gpu-real.json"
