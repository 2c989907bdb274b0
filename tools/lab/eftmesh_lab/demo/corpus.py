"""Public-domain prose for pre-training, from Debian packages.

The King James Bible (`bible-kjv`, printed by its `bible` program) and Jane Austen's six novels
(`r-cran-janeaustenr`, an R lazy-load database read here by a small standard-library parser of
R's serialization format, so R itself is not needed). The prose gives the models general
language; the synthetic world (`world.py`) is what the evaluation measures.
"""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

DEBIAN_PACKAGES = ("bible-kjv", "r-cran-janeaustenr")
AUSTEN_DATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                 "sensesensibility")
BIBLE_RANGE = "Gen1:1-Rev22:21"


class CorpusUnavailable(RuntimeError):
    """The prose sources are missing and could not be installed."""


def ensure_packages(install: bool = True) -> None:
    """Make sure the Debian packages are present, installing them with apt-get when allowed.

    Raises CorpusUnavailable with the command to run when they are missing and cannot be
    installed (no root, no apt, no network).
    """
    if shutil.which("bible") and AUSTEN_DATA.with_suffix(".rdx").exists():
        return
    hint = f"install them with: apt-get update && apt-get install -y {' '.join(DEBIAN_PACKAGES)}"
    if not install or shutil.which("apt-get") is None:
        raise CorpusUnavailable(f"Debian packages {DEBIAN_PACKAGES} are missing; {hint}")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *DEBIAN_PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CorpusUnavailable(
                f"`{' '.join(cmd)}` failed ({result.stderr.strip()[-300:]}); {hint}")
    if not (shutil.which("bible") and AUSTEN_DATA.with_suffix(".rdx").exists()):
        raise CorpusUnavailable(f"apt-get ran but the prose files are still missing; {hint}")


def bible_text() -> str:
    """The KJV as paragraphs, one per chapter, without verse references."""
    out = subprocess.run(["bible", "-f", BIBLE_RANGE], capture_output=True, text=True,
                         check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        match = re.match(r"(\w+?\d+):\d+ (.*)", line)
        if match:
            chapters.setdefault(match.group(1), []).append(match.group(2).strip())
        elif line.strip() and chapters:  # a verse wrapped onto the next line
            next(reversed(chapters.values())).append(line.strip())
    return "\n".join(" ".join(verses) for verses in chapters.values())


def austen_texts() -> dict[str, str]:
    """Each novel as paragraphs separated by newlines (the package stores one line per
    printed line, with empty lines between paragraphs)."""
    index = _unserialize(gzip.decompress(AUSTEN_DATA.with_suffix(".rdx").read_bytes()))
    entries = index["values"][index["names"].index("variables")]
    variables = dict(zip(entries["names"], entries["values"]))  # name -> [offset, length]
    rdb = AUSTEN_DATA.with_suffix(".rdb").read_bytes()
    texts = {}
    for novel in AUSTEN_NOVELS:
        offset, length = (int(x) for x in variables[novel])
        lines = _unserialize(_decompress_rdb(rdb[offset:offset + length]))
        paragraphs = " ".join(line.strip() if line.strip() else "\n" for line in lines)
        texts[novel] = re.sub(r"\s*\n\s*", "\n", paragraphs).strip()
    return texts


def _decompress_rdb(blob: bytes) -> bytes:
    """One lazy-load record: a 4-byte big-endian length, then zlib data (R's default
    compression; the other kinds prefix a type byte, which this package does not use)."""
    (length,) = struct.unpack(">I", blob[:4])
    data = zlib.decompress(blob[4:])
    if len(data) != length:
        raise ValueError("corrupt R lazy-load record")
    return data


def _unserialize(data: bytes) -> dict | list | None:
    """Read the subset of R's XDR serialization format (version 2 or 3) that data files of
    strings and numbers use: vectors, pairlists, symbols and attributes.

    Returns a list for a vector, or a dict {"values": ..., <attribute name>: ...} when the
    vector has attributes (the "names" attribute gives its element names).
    """
    if data[:2] != b"X\n":
        raise ValueError("not an R XDR serialization")
    pos = 2
    symbols: list[str] = []

    def read_int() -> int:
        nonlocal pos
        (value,) = struct.unpack(">i", data[pos:pos + 4])
        pos += 4
        return value

    version = read_int()
    pos += 8  # writer and minimal reader R versions
    if version == 3:
        encoding_length = read_int()  # then the native encoding's name, unused
        pos += encoding_length

    def read_item() -> object:
        nonlocal pos
        flags = read_int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: an earlier symbol
            index = flags >> 8 or read_int()
            return symbols[index - 1]
        if kind == 1:  # SYMSXP
            name = read_item()
            symbols.append(name)
            return name
        if kind == 9:  # CHARSXP
            length = read_int()
            if length == -1:
                return None
            value = data[pos:pos + length].decode("utf-8", "replace")
            pos += length
            return value
        if kind == 2:  # LISTSXP: attributes, tag, value, then the rest of the list
            items: dict = {}
            while kind == 2:
                if has_attr:
                    read_item()
                tag = read_item() if has_tag else str(len(items))
                items[tag] = read_item()
                flags = read_int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != 254:
                raise ValueError(f"unsupported pairlist tail type {kind}")
            return items
        if kind in (10, 13):  # LGLSXP, INTSXP
            length = read_int()
            value = list(struct.unpack(f">{length}i", data[pos:pos + 4 * length]))
            pos += 4 * length
        elif kind == 14:  # REALSXP
            length = read_int()
            value = list(struct.unpack(f">{length}d", data[pos:pos + 8 * length]))
            pos += 8 * length
        elif kind in (16, 19):  # STRSXP, VECSXP
            value = [read_item() for _ in range(read_int())]
        else:
            raise ValueError(f"unsupported R type {kind}")
        if has_attr:
            return {"values": value, **read_item()}
        return value

    return read_item()
