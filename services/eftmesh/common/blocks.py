"""The key of a block of tokens, shared by the logit services' prefix caches (logit/prefix.py)
and the combiner's estimate of what they hold (combiner/prefixes.py): one chain, so that equal
keys on both sides name the same prefix.

A full block's key is BLAKE2b-256 of its parent's key and its token ids as 64-bit integers,
so a key names the whole prefix up to the block's end (logit/prefix.py says why BLAKE2b).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = bytes(32)  # the parent key of a sequence's first block


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: BLAKE2b-256 of its parent's key and its token ids (int64)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(array("q", tokens).tobytes())
    return h.digest()
