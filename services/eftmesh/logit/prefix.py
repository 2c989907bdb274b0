"""Prefix caching: full KV blocks shared between sessions, keyed by the tokens they hold.

vLLM's automatic prefix caching, over the paged pool of kvcache.py. A full block (its
`block_size` tokens all written) is keyed by a hash of the key of the block before it and its
own token ids, so a key names the whole prefix up to the block's end, not the block's tokens
alone: two sessions whose first 3 x block_size tokens agree hold keys that agree for their
first three blocks. A new session (or one re-sent from position 0 after a failover) walks its
tokens block by block while the keys are registered, takes those blocks by reference, and runs
only the rest; the cap is the caller's: at least its last `rows` tokens (whose logits it
wants) are always run.

Keys (common/blocks.py, shared with the combiner's estimate) are BLAKE2b digests (256 bits)
of the parent's key and the block's ids as 64-bit integers. A collision would serve one
prompt another prompt's keys and values, silently: so not Python's `hash()` of a tuple (64
bits, and by design easy to collide), which is why vLLM moved its block hashes to SHA-256
(GHSA-rm76-4mrf-v9r8); BLAKE2b is as collision resistant and faster in CPython.

Only full blocks are registered, and writes only ever go past a session's length, so a
registered block is never written, with one exception the pool handles before any write:
a session cut back (rolled back after rejected drafts) into the middle of a full block, then
appending there. If other sessions share that block, the session gets a copy (copy-on-write);
if it holds the only reference, the block is unregistered and written in place. Exactness
first: a shared block's contents never change.

A block no session references but whose key is registered stays cached ("idle"), reusable by
a later match, until the pool needs room: idle blocks are evicted least recently released
first, before the free list runs dry counts as full, and so before any idle session is
evicted (admission.py). A session's blocks are released last block first, so the tail of a
prefix (the least shared part) is evicted before its head, as in vLLM.

No torch here: the pool (kvcache.py) owns the blocks' reference counts and tensors; this is
the registry of keys and the LRU of idle cached blocks.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    """Registered full blocks by key, and the idle ones (no reference) in LRU order.

    Counters (read by the service's metrics): `lookups` (matches attempted), `queried_tokens`
    (tokens those lookups could have matched), `hit_tokens` (tokens matched), `evictions`
    (idle cached blocks reclaimed for room).
    """

    def __init__(self) -> None:
        self.block_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        # registered blocks no session references, least recently released first
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.lookups = self.queried_tokens = self.hit_tokens = self.evictions = 0

    def __len__(self) -> int:
        return len(self.key_of)

    def register(self, block: int, key: bytes) -> None:
        """Make `block` (full, written, referenced) findable by `key`, unless the key already
        names another block (two sessions computed the same prefix at once: the later copy
        stays private and returns to the free list when released, as in vLLM)."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key] = block
            self.key_of[block] = key

    def unregister(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.block_of[key]
        self.idle.pop(block, None)

    def released(self, block: int) -> bool:
        """The last reference to `block` went: keep it as idle cache (True) if it is registered."""
        if block in self.key_of:
            self.idle[block] = None
            return True
        return False

    def pop_idle(self) -> int | None:
        """The least recently released idle block, unregistered (evicted for room); None if none."""
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)
        self.unregister(block)
        self.evictions += 1
        return block

    def clear(self) -> list[int]:
        """Forget every registration; returns the idle blocks (now plain free blocks)."""
        idle = list(self.idle)
        self.block_of.clear()
        self.key_of.clear()
        self.idle.clear()
        return idle
