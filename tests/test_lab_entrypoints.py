"""Every lab command starts: its module imports and its parser builds (`--help`), including the
benchmarks no other test runs (bench_http, bench_prefix). A name that moved under
a rarely run script (bench/gpu_profile.py read engine.DTYPES after it moved to placement.py)
fails here instead of on the machine that runs it."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import eftmesh_lab

COMMANDS = sorted(m.name for m in pkgutil.iter_modules(eftmesh_lab.__path__)
                  if hasattr(importlib.import_module(f"eftmesh_lab.{m.name}"), "main"))


def test_every_benchmark_and_load_test_is_a_command():
    assert {"bench", "bench_engine", "bench_http", "bench_load", "bench_prefix", "bench_vocab", "gpu_targets",
            "loadtest", "real_shapes"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_the_command_parses_help(name, monkeypatch, capsys):
    main = importlib.import_module(f"eftmesh_lab.{name}").main
    monkeypatch.setattr(sys, "argv", [name, "--help"])  # (for a main that reads sys.argv itself)
    with pytest.raises(SystemExit) as done:
        main() if main.__code__.co_argcount == 0 else main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out
