"""What the logit services' prefix caches likely hold, as the combiner can tell from outside.

The scheduler admits new generations within a prefill budget per step (--prefill-tokens). Like
vLLM's scheduler, which counts only the tokens a request still has to compute after its prefix
cache hits, it counts a prompt's tokens less those the logit services' prefix caches likely hold:
a chat's second turn, or the sixteenth request behind one long system prompt, costs the step its
new tokens, not its whole history (logit/prefix.py holds the caches themselves).

The combiner cannot look into the services' caches, so it keeps an estimate, as SGLang's router
does for cache-aware routing: the token sequences whose prefill completed (and whole finished
sequences, prompt and output), each as a chain of whole-block keys, the least recently used
forgotten first. A prompt's estimate is the longest remembered chain it begins with. That is an
upper bound: a service may have evicted those blocks, or the prompt may land on another replica
(prefix-aware routing sends prompts that begin alike to one replica). An overestimate makes a
step prefill more than the budget planned, which costs that step time, never a wrong token.

Keys are the services' own (common.blocks: each block's key hashes its parent's key and its
tokens), so equal keys mean equal prefixes; the combiner does not need the services' block size
to be exact: at its granularity (16 tokens) it errs by under a block per prompt.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Sequence

from eftmesh.common.blocks import ROOT, block_key

BLOCK = 16  # tokens per remembered block: the logit services' default --kv-block-size
CAPACITY = 1 << 16  # blocks remembered (~65k blocks: about 1M tokens of distinct prefixes, a few MB)


def chain(ids: Sequence[int], block: int = BLOCK) -> Iterator[bytes]:
    """The key of every whole block of `ids` in order (the services' own keys, common.blocks);
    lazily, so a lookup stops hashing at its first miss."""
    parent = ROOT
    for i in range(len(ids) // block):
        parent = block_key(parent, ids[i * block:(i + 1) * block])
        yield parent


class PrefixEstimate:
    """Remembered block chains, least recently used forgotten first; thread-safe."""

    def __init__(self, block: int = BLOCK, capacity: int = CAPACITY) -> None:
        if block < 1 or capacity < 1:
            raise ValueError(f"block and capacity must be >= 1, got {block} and {capacity}")
        self.block, self.capacity = block, capacity
        self._keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def cached(self, ids: Sequence[int]) -> int:
        """Tokens at the start of `ids` the caches likely hold: whole remembered blocks, never
        the last token (a prefill always runs at least the token whose row it returns)."""
        held = 0
        with self._lock:
            for key in chain(ids[:max(len(ids) - 1, 0)], self.block):
                if key not in self._keys:
                    break
                self._keys.move_to_end(key)
                held += self.block
        return held

    def uncached(self, ids: Sequence[int]) -> int:
        """Tokens of `ids` a prefill likely has to run: at least 1."""
        return len(ids) - self.cached(ids)

    def remember(self, ids: Sequence[int]) -> None:
        """The services ran `ids` (a completed prefill, a finished sequence): its whole blocks
        are likely cached now."""
        keys = list(chain(ids, self.block))
        with self._lock:
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
