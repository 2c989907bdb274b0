"""How many CPUs this process may use, and the `auto` thread count flags resolve to.

`os.cpu_count()` counts the machine's CPUs, not the process's: a container limited to two
CPUs on a 64-core node sees 64. The CPUs a process may use are its affinity mask (cpusets:
`taskset`, Kubernetes' static CPU manager), further limited by a CPU quota (the cgroup's
`cpu.max` under cgroup v2, `cpu.cfs_quota_us` / `cpu.cfs_period_us` under v1: a pod's CPU
limit), rounded up. What the JVM and Go (GOMAXPROCS via automaxprocs) size their thread pools
by.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

# The combiner's `--threads auto` ceiling, a guard rather than a measured optimum (only 1 against
# 2 threads has been measured, on 2-vCPU machines: docs/configuration.md): a step's passes are
# memory-bound, and more threads would contend with gRPC's own and, on a shared node, other pods'
MIXING_THREADS_CAP = 4

# cgroup v2's quota file, then v1's pair (where the process's cgroup is mounted in a container)
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def usable_cpus(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int:
    """The CPUs this process may run on (its affinity mask), at most its cgroup's CPU quota
    rounded up; at least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota(v2, v1)
    return max(1, min(n, math.ceil(quota)) if quota is not None else n)


def cgroup_quota(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> float | None:
    """The cgroup's CPU quota in CPUs (quota / period), or None where there is none (no limit,
    no cgroup file, or one that cannot be read)."""
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if v1[0].exists():
            quota_us, period_us = int(v1[0].read_text()), int(v1[1].read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def thread_count(value: str, *, cap: int) -> int:
    """A `--threads`-style flag's value: a positive integer, or `auto` for `usable_cpus()` at
    most `cap`. Raises ValueError with what to write instead."""
    if value == "auto":
        return max(1, min(cap, usable_cpus()))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"expected a positive integer or 'auto', got {value!r}")
    return n


def threads_arg(cap: int) -> Callable[[str], int]:
    """An argparse `type` for a `--threads` flag (`thread_count`); with default="auto" argparse
    resolves the default too."""

    def parse(value: str) -> int:
        try:
            return thread_count(value, cap=cap)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
