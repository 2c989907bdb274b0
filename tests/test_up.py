"""The README's first command path, as a newcomer runs it: `eftmesh up --once` starts three
logit services and a combiner as processes, streams one generation, stops them all and exits 0.

Runs over the tiny random family (the trained demo family is too slow to load here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, free_port_block

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROLES = ("base-large", "base-small", "ft-small")
TIMEOUT_S = 240  # a hard cap; on an idle 2-core machine the run takes well under a minute


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline.strip()))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find leftover processes")
def test_up_once_serves_a_generation_and_stops_every_process(tiny_family, tmp_path):
    models = tiny_family["base-large"].parent
    assert {p.parent for p in tiny_family.values()} == {models}
    port = free_port_block(1 + len(ROLES))
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "eftmesh.cli", "up", "--once", "--models", str(models),
           "--port", str(port), "--log-dir", str(log_dir), "--http-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"eftmesh up --once still running after {TIMEOUT_S} s:\n{out}")
    finally:
        leftovers = processes_mentioning(str(models))
        for pid, _ in leftovers:
            os.kill(pid, signal.SIGKILL)

    assert proc.returncode == 0, out
    for role in ROLES:
        assert f"{role} SERVING" in out, out
    assert f"combiner SERVING on 127.0.0.1:{port}" in out, out
    assert "tokens in" in out and "tokens/s" in out, out
    assert out.rstrip().endswith("mesh stopped"), out
    assert leftovers == [], f"processes left running after eftmesh up exited: {leftovers}"
    assert {p.name for p in log_dir.iterdir()} == {f"{r}.log" for r in (*ROLES, "combiner")}


@pytest.mark.parametrize("role,chat", [("ft-small", True), ("base-small", False)])
def test_up_model_serves_one_model_in_every_role(role, chat, tmp_path):
    """`eftmesh up --model SPEC`: one model in every role; a chat when it has a template, else a
    prompt."""
    model = Path(__file__).resolve().parents[1] / "models" / "demo" / role
    port = free_port_block(4)
    proc = subprocess.run([sys.executable, "-m", "eftmesh.cli", "up", "--once", "--model", str(model), "--port", str(port), "--http-port", "off",
                           "--kv-cache-tokens", "1024", "--max-new-tokens", "8", "--log-dir", str(tmp_path / "logs")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert f"{model} in every role: EFT reduces to the model itself" in out
    assert ("user: What is the capital of France?\nassistant:" in out) == chat, out
    assert ("it has no chat template" in out) == (not chat), out
    assert "tokens in" in out and "ft-small alone" not in out, out  # no contrasts: every role is the same
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["base-large.log", "base-small.log", "combiner.log",
                                                                    "ft-small.log"]


def test_up_passes_one_kv_sizing_and_compile_to_every_logit_service_in_their_own_words(capsys):
    import argparse

    from eftmesh.launcher import logit_flags
    from eftmesh.logit.server import parse_args

    p = argparse.ArgumentParser(prog="eftmesh up")

    def ns(**kw):
        return argparse.Namespace(**{"kv_cache_tokens": None, "kv_cache_memory": None, "gpu_memory_utilization": None,
                                     "kv_cache_dtype": "auto", "torch_compile": False, **kw})

    assert logit_flags(p, ns()) == []
    for given, engine in [(ns(kv_cache_memory="2GiB", torch_compile=True), {"kv_cache_memory": 2**31}),
                          (ns(gpu_memory_utilization=0.3), {"gpu_memory_utilization": 0.3}),
                          (ns(kv_cache_tokens=1024), {"kv_cache_tokens": 1024}),
                          (ns(kv_cache_memory="1GiB", kv_cache_dtype="fp8"),
                           {"kv_cache_memory": 2**30, "kv_cache_dtype": "fp8"})]:
        flags = logit_flags(p, given)
        cfg = parse_args(["--model", "m", "--role", "base-large", *flags], environ={})  # what each service reads
        assert {k: getattr(cfg.engine, k) for k in engine} == engine
        assert cfg.engine.graphs.compile == given.torch_compile
    for given, message in [(ns(kv_cache_tokens=8, gpu_memory_utilization=0.3),
                            "--kv-cache-tokens and --gpu-memory-utilization both size the KV cache: give one of them"),
                           (ns(gpu_memory_utilization=3.0), "0 < F <= 1, got 3")]:
        with pytest.raises(SystemExit):
            logit_flags(p, given)
        assert message in capsys.readouterr().err
