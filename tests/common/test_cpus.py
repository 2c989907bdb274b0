"""common/cpus.py: the CPUs a process may use (affinity and cgroup quota) and `--threads auto`."""

import argparse
import os

import pytest

from eftmesh.common import cpus


def quota_files(tmp_path, v2=None, v1=None):
    """cgroup quota files as a container shows them (v2's cpu.max, or v1's quota and period)."""
    two = tmp_path / "cpu.max"
    one = (tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us")
    if v2 is not None:
        two.write_text(v2)
    if v1 is not None:
        one[0].write_text(str(v1[0]))
        one[1].write_text(str(v1[1]))
    return two, one


@pytest.mark.parametrize("v2,v1,want", [
    ("max 100000\n", None, None),  # v2, no limit
    ("150000 100000\n", None, 1.5),  # v2, a limit of 1.5 CPUs
    (None, (-1, 100000), None),  # v1, no limit
    (None, (300000, 100000), 3.0),  # v1, 3 CPUs
    (None, None, None),  # no cgroup files (not Linux, or not mounted)
    ("garbage", None, None),  # unreadable: as if unlimited
])
def test_the_cgroup_quota_is_read_from_v2_then_v1(tmp_path, v2, v1, want):
    assert cpus.cgroup_quota(*quota_files(tmp_path, v2, v1)) == want


def test_usable_cpus_is_the_affinity_mask_at_most_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpus.usable_cpus(*quota_files(tmp_path)) == 8  # no quota files: the mask
    assert cpus.usable_cpus(*quota_files(tmp_path, "max 100000")) == 8  # no limit
    assert cpus.usable_cpus(*quota_files(tmp_path, "150000 100000")) == 2  # a 1.5-CPU limit: 2 threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cpus.usable_cpus(*quota_files(tmp_path, "400000 100000")) == 1  # pinned to one CPU


def test_threads_auto_is_the_usable_cpus_at_most_the_cap(monkeypatch):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 16)
    assert cpus.thread_count("auto", cap=cpus.MIXING_THREADS_CAP) == cpus.MIXING_THREADS_CAP
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 2)
    assert cpus.thread_count("auto", cap=4) == 2
    assert cpus.thread_count("3", cap=2) == 3  # (a number is taken as given)


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", ""])
def test_a_bad_threads_value_says_what_to_write(bad):
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=cpus.threads_arg(4), default="auto")
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        cpus.thread_count(bad, cap=4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", bad])


def test_the_combiners_threads_default_to_auto(monkeypatch):
    """The combiner's --threads is `auto` unless given: the CPUs it may use, at most the cap."""
    from eftmesh.combiner.server import parse_args

    monkeypatch.setattr(cpus, "usable_cpus", lambda: 3)
    ups = ["--upstream=base-large=a:1", "--upstream=base-small=b:1", "--upstream=ft-small=c:1", "--tokenizer", "t"]
    assert parse_args(ups).threads == 3
    assert parse_args([*ups, "--threads", "1"]).threads == 1
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 64)
    assert parse_args(ups).threads == cpus.MIXING_THREADS_CAP
