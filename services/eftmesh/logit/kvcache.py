"""Paged KV memory for every session of one model: vLLM's block pool, in plain torch.

The pool is allocated once (at the first forward, when the model's key shape is known): per
layer one tensor, on the device that layer's keys arrive on (a model sharded over several
GPUs keeps each layer's cache next to the layer), of `num_slots` token slots holding keys and values side by side,
`[num_slots, 2, kv_heads * head_dim]` (one write and one gather per layer, not two). Slots come in blocks of `block_size` tokens; block 0 is scratch that padding
writes to and reads from, never owned by a session. A session owns a list of blocks, so its
token at position p lives in slot `blocks[p // block_size] * block_size + p % block_size`.

Each forward of a batch writes only its new tokens' keys and values into their slots (in
place: nothing that is already cached moves), and reads the batch's keys through one gather
per layer into `[batch, heads, length, head_dim]` for attention. Rolling a session back to
`start` tokens only shortens it (and frees the blocks past the new end): the stale slots are
beyond its length, masked out, and overwritten by the next tokens.

With prefix caching (prefix.py) a block may be shared: the pool counts references per block,
a session's table may begin with blocks other sessions hold too, and a full block outlives its
sessions as idle cache until the pool needs it. `free_blocks` counts those idle blocks as
free: taking one evicts it first.

Memory is budgeted in tokens, not sessions: waste is at most one partly filled block per
session, so bytes per cached token stay close to the theoretical
2 x layers x kv_heads x head_dim x dtype bytes.

No gRPC, no model loading here; the engine drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from eftmesh.common.blocks import ROOT, block_key
from eftmesh.logit.prefix import PrefixCache


# --kv-cache-dtype (flags.KV_CACHE_DTYPES) -> the pool's storage dtype; "auto" is the model's
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the pool stores keys and values in under --kv-cache-dtype `name`."""
    if name == "auto":
        return model_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be auto or one of {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


class PoolExhausted(Exception):
    """Not enough free blocks for a request (after the caller's evictions)."""


@dataclass
class BlockTable:
    """One session's blocks and how many tokens they hold.

    With prefix caching, also the ids of those tokens and the key of each full block (the
    chain common.blocks.block_key builds), so that its full blocks can be registered and a later
    append at a block boundary can be matched against the cache.
    """

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


class PagedKVPool:
    """Fixed-size paged KV memory: block allocation, slot arithmetic and the per-layer tensors."""

    def __init__(
        self, capacity_tokens: int, block_size: int, layers: int, device: torch.device, dtype: torch.dtype,
        prefix_cache: bool = False,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if capacity_tokens < block_size:
            raise ValueError(f"the KV cache must hold at least one block of {block_size} tokens")
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size  # usable blocks; block 0 is scratch on top
        self.layers, self.device, self.dtype = layers, device, dtype
        # An 8-bit float pool (--kv-cache-dtype fp8*): keys and values are clamped to its range
        # (a cast past it gives NaN, not the largest value) and stored at scale 1, as vLLM does
        # without calibrated scales; its bytes move as uint8 (index_copy_ has no float8 kernel).
        self.fp8_max = torch.finfo(dtype).max if dtype in KV_DTYPES.values() else 0.0
        self._free = list(range(self.num_blocks, 0, -1))  # pop() hands out low blocks first
        self._refs = [0] * (self.num_blocks + 1)  # sessions holding each block (block 0: scratch, never)
        self.prefix: PrefixCache | None = PrefixCache() if prefix_cache else None
        # per layer [num_slots, 2, kv_heads * head_dim] (keys, values) on the layer's device; None
        # until that layer's first update
        self.kv: list[torch.Tensor | None] = [None] * layers
        self.kv_heads = self.head_dim = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks a reserve may take: the free list and the idle cached blocks (evicted when taken)."""
        return len(self._free) + (len(self.prefix.idle) if self.prefix is not None else 0)

    @property
    def used_blocks(self) -> int:
        """Blocks some session references (a shared block counts once)."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered full blocks, referenced or idle."""
        return len(self.prefix) if self.prefix is not None else 0

    def refs(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _take(self) -> int:
        """A block for one more reference holder: a free one, else the least recently released
        idle cached block (evicted). The caller has checked free_blocks."""
        block = self._free.pop() if self._free else self.prefix.pop_idle()
        self._refs[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0 and not (self.prefix is not None and self.prefix.released(block)):
            self._free.append(block)

    def _shared_tail(self, table: BlockTable) -> int | None:
        """Index of the block the next write lands in when that block is registered (a session
        cut back into a full cached block); None otherwise."""
        if self.prefix is None or table.length % self.block_size == 0:
            return None
        i = table.length // self.block_size
        return i if i < len(table.blocks) and table.blocks[i] in self.prefix.key_of else None

    def blocks_needed(self, table: BlockTable, length: int) -> int:
        """Blocks `reserve(table, length)` takes from free_blocks (a copy-on-write included)."""
        grow = max(self.blocks_for(length) - len(table.blocks), 0)
        i = self._shared_tail(table)
        return grow + (1 if i is not None and self._refs[table.blocks[i]] > 1 else 0)

    def reserve(self, table: BlockTable, length: int) -> None:
        """Grow `table` to hold `length` tokens, all or nothing; and make the block its next
        write lands in its own: a registered block it holds alone is unregistered, one it
        shares is copied (copy-on-write), so a cached block is never written."""
        need = self.blocks_needed(table, length)
        if need > self.free_blocks:
            raise PoolExhausted(f"needs {need} more blocks of {self.block_size} tokens, {self.free_blocks} free")
        i = self._shared_tail(table)
        if i is not None:
            old = table.blocks[i]
            if self._refs[old] == 1:
                self.prefix.unregister(old)
            else:
                table.blocks[i] = self._copy(old)
                self._drop(old)
        while len(table.blocks) < self.blocks_for(length):
            table.blocks.append(self._take())

    def _copy(self, block: int) -> int:
        """A fresh block holding `block`'s keys and values (every allocated layer, on its device)."""
        new, bs = self._take(), self.block_size
        for kv in self.kv:
            if kv is not None:
                kv[new * bs:(new + 1) * bs].copy_(kv[block * bs:(block + 1) * bs])
        return new

    def truncate(self, table: BlockTable, length: int) -> None:
        """Cut `table` back to `length` tokens, releasing the blocks past it (last first, so an
        idle cached prefix is evicted tail first)."""
        keep = self.blocks_for(length)
        while len(table.blocks) > keep:
            self._drop(table.blocks.pop())
        table.length = min(table.length, length)
        del table.ids[table.length:]
        del table.keys[table.length // self.block_size:]

    def free(self, table: BlockTable) -> None:
        self.truncate(table, 0)

    def match(self, table: BlockTable, ids: Sequence[int], most: int) -> int:
        """Extend `table` (at a block boundary) by the longest run of cached full blocks that
        holds ids[:most] block by block, taking them by reference; returns the tokens matched
        (0 without a cache, or off a block boundary)."""
        bs = self.block_size
        if not self._tracked(table) or table.length % bs:
            return 0
        limit = min(most, len(ids)) // bs
        if limit < 1:
            return 0
        parent = table.keys[-1] if table.keys else ROOT
        matched = 0
        for j in range(limit):
            key = block_key(parent, ids[j * bs:(j + 1) * bs])
            block = self.prefix.block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                self.prefix.idle.pop(block)
            self._refs[block] += 1
            table.blocks.append(block)
            table.keys.append(key)
            parent, matched = key, matched + bs
        table.ids.extend(ids[:matched])
        table.length += matched
        self.prefix.lookups += 1
        self.prefix.queried_tokens += limit * bs
        self.prefix.hit_tokens += matched
        return matched

    def commit(self, table: BlockTable, ids: Sequence[int]) -> None:
        """After a forward wrote `ids` past the table's length: count them, and register the
        blocks they filled."""
        tracked = self._tracked(table)
        table.length += len(ids)
        if not tracked:
            return
        table.ids.extend(ids)
        bs = self.block_size
        while len(table.keys) < table.length // bs:
            i = len(table.keys)
            key = block_key(table.keys[-1] if table.keys else ROOT, table.ids[i * bs:(i + 1) * bs])
            table.keys.append(key)
            self.prefix.register(table.blocks[i], key)

    def _tracked(self, table: BlockTable) -> bool:
        """Whether the table's ids and keys follow its length (tables filled while the cache was
        off do not, and are never matched nor registered)."""
        return (self.prefix is not None and len(table.ids) == table.length
                and len(table.keys) == table.length // self.block_size)

    def set_prefix_cache(self, on: bool) -> None:
        """Turn prefix caching on or off from now on. Turning it off forgets every registration
        (idle cached blocks become free), so nothing cached before is matched again; sessions
        held keep their blocks."""
        if on and self.prefix is None:
            self.prefix = PrefixCache()
        elif not on and self.prefix is not None:
            self._free.extend(reversed(self.prefix.clear()))
            self.prefix = None

    def layer(self, layer_idx: int, kv_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
        """Layer `layer_idx`'s tensor, allocated on `device` (where its keys arrive) at its first use."""
        kv = self.kv[layer_idx]
        if kv is None:
            if self.kv_heads and (kv_heads, head_dim) != (self.kv_heads, self.head_dim):
                raise ValueError(f"layer {layer_idx} has {kv_heads} kv heads of {head_dim}, "
                                 f"the others {self.kv_heads} of {self.head_dim}")
            self.kv_heads, self.head_dim = kv_heads, head_dim
            slots = (self.num_blocks + 1) * self.block_size
            kv = self.kv[layer_idx] = torch.zeros((slots, 2, kv_heads * head_dim), device=device, dtype=self.dtype)
        return kv

    def allocate(self, kv_heads: int, head_dim: int, device: torch.device | None = None) -> None:
        """Every layer's tensor at once, on `device` (default: the pool's)."""
        for i in range(self.layers):
            self.layer(i, kv_heads, head_dim, self.device if device is None else device)

    def devices(self) -> list[torch.device]:
        """The devices the allocated layers live on, in layer order, without repeats."""
        return list(dict.fromkeys(t.device for t in self.kv if t is not None))

    def nbytes(self) -> int:
        """Bytes the pool's tensors occupy (measured from the tensors themselves)."""
        return sum(t.untyped_storage().nbytes() for t in self.kv if t is not None)

    def bytes_per_token(self) -> float:
        """Measured bytes per usable token slot (scratch block included in the cost)."""
        return self.nbytes() / self.capacity_tokens

    def theoretical_bytes_per_token(self) -> int:
        """2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def slots(self, tables: list[BlockTable], positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Slot of each (row, position); scratch slot 0 where `valid` is False.

        Args:
            tables: one block table per row.
            positions: [rows, cols] int64 token positions.
            valid: [rows, cols] bool, positions that belong to the row's sequence.

        Returns:
            [rows, cols] int64 slot indices.
        """
        return torch.from_numpy(self.slot_array(block_array(tables), positions.numpy(), valid.numpy()))

    def slot_array(self, table: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """`slots` over a `block_array` table, in numpy: a batch's index arithmetic is a dozen
        small ops, which numpy runs in ~1 us each where torch's dispatch costs ~5-10."""
        bs = self.block_size
        block = np.minimum(positions // bs, table.shape[1] - 1)
        slot = np.take_along_axis(table, block, axis=1) * bs + positions % bs
        return np.where(valid, slot, 0)


def block_array(tables: Sequence[BlockTable]) -> np.ndarray:
    """[rows, widest] int64 block numbers, rows padded with 0 (the scratch block; at least one
    column): built from one list, not a tensor per row (~10 us each at 32 rows)."""
    width = max(1, max(len(t.blocks) for t in tables))
    flat: list[int] = []
    for t in tables:
        flat += t.blocks
        flat += [0] * (width - len(t.blocks))
    return np.array(flat, dtype=np.int64).reshape(len(tables), width)


class BatchView(Cache):
    """The `Cache` one batched forward sees: writes new keys and values into the pool and
    returns the batch's keys and values gathered from it.

    Row b of the batch holds `past[b]` cached tokens and appends `new[b]` (<= n) tokens; query
    column j of row b is position past[b] + j. Columns j >= new[b] are padding: they write to
    the scratch block, and no real token attends to them (they come after every real one).
    """

    def __init__(self, pool: PagedKVPool, tables: list[BlockTable], past: list[int], new: list[int], n: int) -> None:
        super().__init__(layers=[])
        self.pool = pool
        rows = len(tables)
        self.rows, self.n = rows, n
        self.length = max(p + n for p in past)  # columns of the gathered keys
        # The index arithmetic runs in numpy (PagedKVPool.slot_array): at 32 rows torch's per-op
        # dispatch made this ~1.1 ms of a logit service's CPU per step.
        past_a = np.array(past, dtype=np.int64)  # [rows]
        new_a = np.array(new, dtype=np.int64)  # [rows]
        j = np.arange(n, dtype=np.int64)
        positions = past_a[:, None] + j[None, :]  # [rows, n]
        write_valid = j[None, :] < new_a[:, None]  # [rows, n]
        cols = np.arange(self.length, dtype=np.int64)
        read_pos = np.broadcast_to(cols[None, :], (rows, self.length))  # [rows, length]
        read_valid = read_pos < (past_a + new_a)[:, None]
        dev = pool.device
        table = block_array(tables)
        write_idx = torch.from_numpy(pool.slot_array(table, positions, write_valid).reshape(-1))  # [rows * n]
        read_idx = torch.from_numpy(pool.slot_array(table, read_pos, read_valid).reshape(-1))  # [rows * length]
        self.positions = torch.from_numpy(positions)
        # A query at position q sees every column <= q of its own row: its cached past, the new
        # tokens up to itself, and (for padding queries only) stale or scratch slots after the
        # row's end; never a fully masked row, so no NaN reaches a real token.
        allowed = torch.from_numpy(cols[None, None, None, :] <= positions[:, None, :, None])  # [rows, 1, n, length]
        # Per device, built once per forward: the write and read indices (and the mask, see
        # mask_on). The pool's own device is filled now (the one-device case); a layer on
        # another device copies them there at its first update and the layers after it reuse it.
        self._idx: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._idx_cpu = (write_idx, read_idx)
        self.write_idx, self.read_idx = self._indices(dev)
        self._allowed = allowed.to(dev)
        self._masks: dict[torch.device, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # the mask handed to the model (attention_mask's result)

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(write_idx, read_idx) on `device`, copied there once per forward."""
        idx = self._idx.get(device)
        if idx is None:
            idx = self._idx[device] = tuple(t.to(device) for t in self._idx_cpu)
        return idx

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, n, length] additive mask: 0 where attention is allowed, the dtype's minimum elsewhere."""
        self.mask = torch.zeros(self._allowed.shape, dtype=dtype, device=self._allowed.device).masked_fill_(
            ~self._allowed, torch.finfo(dtype).min
        )
        self._masks = {self.mask.device: self.mask}
        return self.mask

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The mask attention_mask() built, on `device`: copied there once per forward (the layers
        of a sharded model that share a device share the copy)."""
        if self.mask is None:
            raise RuntimeError("attention_mask() first")
        mask = self._masks.get(device)
        if mask is None:
            mask = self._masks[device] = self.mask.to(device)
        return mask

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [rows, kv_heads, n, head_dim]
        rows, heads, n, dim = key_states.shape
        kv = self.pool.kv[layer_idx]  # [slots, 2, heads * dim], on this layer's device once allocated
        if kv is None:
            kv = self.pool.layer(layer_idx, heads, dim, key_states.device)
        if kv.device == self.write_idx.device:
            write_idx, read_idx = self.write_idx, self.read_idx
        else:
            write_idx, read_idx = self._indices(kv.device)
        if n == 1:  # decode: [rows, heads, 1, dim] flattens to [rows, heads * dim] without a copy
            new = torch.stack((key_states.reshape(rows, heads * dim), value_states.reshape(rows, heads * dim)), dim=1)
        else:
            new = torch.stack((key_states, value_states), dim=2)  # [rows, heads, 2, n, dim]
            new = new.permute(0, 3, 2, 1, 4).reshape(rows * n, 2, heads * dim)
        # Every op here runs once per layer per forward: the fewer, the less a decode step pays
        # in dispatch (CPU) and kernel launches (GPU).
        if self.pool.fp8_max:  # 8-bit floats, stored and gathered as their bytes
            fp8 = self.pool.fp8_max
            kv.view(torch.uint8).index_copy_(0, write_idx, new.clamp(-fp8, fp8).to(kv.dtype).view(torch.uint8))
            kv = kv.view(torch.uint8).index_select(0, read_idx).view(kv.dtype).to(key_states.dtype)
        else:
            if new.dtype != kv.dtype:
                new = new.to(kv.dtype)
            kv.index_copy_(0, write_idx, new)  # [rows * n, 2, heads * dim]
            kv = kv.index_select(0, read_idx)  # [rows * length, 2, heads * dim]
        k, v = kv.view(rows, self.length, 2, heads, dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)  # [rows, kv_heads, length, head_dim]

    # The model asks these of any cache; positions and the 4D mask are given explicitly.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - self.n

    @property
    def is_compileable(self) -> bool:
        return False
