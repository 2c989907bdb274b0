"""A stand-in interpreter for rehearsing bench/gpu.sh where no GPU is (tests/test_gpu_sh.py).

bench/gpu.sh runs only on a lent GPU machine, 15 minutes of device time in all, and runs each
step with `|| true` so that one failure costs the rest nothing. A flag renamed in a benchmark and
not in the script would therefore pass unseen here and waste a step of that lease. With
PY=<a wrapper around this file>, every command the script runs is checked instead of run:

- `-c CODE` (the CUDA check) is skipped: this machine has no GPU;
- `-m pytest ARGS`: the tests are collected (`--collect-only`), not run; at least one must be;
- `-m eftmesh_lab.gpu_targets ARGS`: run for real (it reads the folder's JSON and needs no GPU);
- any other module or script: its argument parser parses ARGS, then it stops before any work.

Each command appends a JSON line to $GPU_SH_LOG when it starts and another when its check passed.
$GPU_SH_FAIL names a command (e.g. eftmesh_lab.real_shapes) that exits 1 after its check, to
rehearse the script's path past that failure.

What it cannot see: anything a command does after parsing (files it reads, the values it
checks itself), a GPU test's fixtures (collection resolves none), and the CUDA check.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from typing import Any

import pytest


def _log(**entry: Any) -> None:
    with open(os.environ["GPU_SH_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


class _Count:
    """A pytest plugin counting the tests selected (after -k)."""

    def __init__(self) -> None:
        self.n = 0

    def pytest_collection_finish(self, session: Any) -> None:
        self.n = len(session.items)


def _parse_only(target: str) -> None:
    """Make the first parse_args record what it parsed and stop the program there."""
    parse = argparse.ArgumentParser.parse_args

    def parsed(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        ns = parse(self, args, namespace)
        _log(target=target, ok=True, parsed={k: v for k, v in vars(ns).items()})
        raise SystemExit(1 if os.environ.get("GPU_SH_FAIL") == target else 0)

    argparse.ArgumentParser.parse_args = parsed  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    if argv[0] == "-c":
        _log(target="-c", start=True)
        _log(target="-c", ok=True)
        return 0
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (argv[0], argv[1:])
    _log(target=target, start=True, args=args)
    if target == "pytest":
        count = _Count()
        rc = pytest.main([*args, "--collect-only"], plugins=[count])
        if rc == 0 and count.n:
            _log(target=target, ok=True, collected=count.n)
        return int(rc)
    sys.argv = [target, *args]
    if target != "eftmesh_lab.gpu_targets":
        _parse_only(target)
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 1
    if target == "eftmesh_lab.gpu_targets":
        _log(target=target, ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
