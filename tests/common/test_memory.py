"""The C allocator's settings (common/memory.py)."""

from __future__ import annotations

import ctypes
import platform

import pytest

from eftmesh.common import memory


def test_an_operators_allocator_settings_are_left_alone() -> None:
    for key in memory.MALLOC_ENV:
        assert memory.keep_freed_memory({key: "1"}) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_keeps_a_steps_freed_buffers_for_the_next_step() -> None:
    """After `keep_freed_memory`, three 16 MiB buffers made, written and freed at every round
    (a step's three answers) are not faulted in afresh each round. Without it glibc gives the
    freed top of its heap back (48 MiB over its 32 MiB trim threshold): the rounds fault every
    page they write (122,560 of 122,880 here), with it none."""
    import resource

    assert memory.keep_freed_memory({}) is True
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20

    def rounds(n: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            bufs = [libc.malloc(size) for _ in range(3)]
            for p in bufs:
                ctypes.memset(p, 1, size)
            for p in bufs:
                libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    rounds(2)  # the first rounds fault their pages in
    assert rounds(10) < 10 * 3 * (size // 4096) // 10
