"""The standard-library reader of R's serialization format, on a hand-built blob."""

from __future__ import annotations

import struct

import pytest

from eftmesh_lab.demo.corpus import _unserialize


def _int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _char(text: str | None) -> bytes:
    if text is None:
        return _int(9, -1)
    raw = text.encode()
    return _int(9 | (1 << 15), len(raw)) + raw  # gp bits (encoding) set, as R writes them


def _strings(*texts: str | None) -> bytes:
    return _int(16, len(texts)) + b"".join(_char(t) for t in texts)


def _header(version: int) -> bytes:
    if version == 2:
        return b"X\n" + _int(2, 0x040201, 0x020300)
    return b"X\n" + _int(3, 0x040201, 0x030500, 5) + b"UTF-8"


@pytest.mark.parametrize("version", [2, 3])
def test_reads_a_named_list_of_strings_and_integers(version: int) -> None:
    names = _int(2 | (1 << 10), 1) + _char("names") + _strings("text", "where")
    blob = (_header(version) + _int(19 | (1 << 9), 2) + _strings("a line", None, "")
            + _int(13, 2, 7, 11) + names + _int(254))
    assert _unserialize(blob) == {"values": [["a line", None, ""], [7, 11]],
                                  "names": ["text", "where"]}


def test_reads_repeated_symbols_by_reference() -> None:
    first = _int(2 | (1 << 10), 1) + _char("names") + _strings("x")
    blob = (_header(3) + _int(19 | (1 << 9), 1) + _int(19 | (1 << 9), 1) + _int(14, 1)
            + struct.pack(">d", 2.5) + first + _int(254)
            + _int(2 | (1 << 10), (1 << 8) | 255) + _strings("outer") + _int(254))
    assert _unserialize(blob) == {"values": [{"values": [[2.5]], "names": ["x"]}],
                                  "names": ["outer"]}


def test_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError):
        _unserialize(b"RDX3\n")
    with pytest.raises(ValueError):
        _unserialize(_header(3) + _int(3))  # a closure
