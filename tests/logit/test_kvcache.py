"""PagedKVPool and BatchView as plain data structures: block allocation (all or nothing),
rollback freeing blocks, slot arithmetic with the scratch block, and the measured bytes of the
pool's tensors against the theoretical 2 x layers x kv_heads x head_dim x dtype bytes."""

from __future__ import annotations

import pytest
import torch

from eftmesh.logit.kvcache import BatchView, BlockTable, PagedKVPool, PoolExhausted

CPU = torch.device("cpu")


def pool(capacity_tokens: int = 20, block_size: int = 4, layers: int = 2, dtype=torch.float32) -> PagedKVPool:
    return PagedKVPool(capacity_tokens, block_size, layers, CPU, dtype)


# --- capacity -----------------------------------------------------------------------------------


def test_capacity_is_whole_blocks_of_the_budget():
    p = pool(capacity_tokens=22, block_size=4)
    assert p.num_blocks == 5
    assert p.capacity_tokens == 20  # a partial block is not usable
    assert p.free_blocks == 5 and p.used_blocks == 0


@pytest.mark.parametrize("capacity,block", [(3, 4), (0, 1), (10, 0), (10, -1)])
def test_a_budget_below_one_block_or_a_bad_block_size_is_refused(capacity, block):
    with pytest.raises(ValueError):
        pool(capacity_tokens=capacity, block_size=block)


@pytest.mark.parametrize("tokens,blocks", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_for_rounds_up(tokens, blocks):
    assert pool(block_size=4).blocks_for(tokens) == blocks


# --- reserve / truncate / free ------------------------------------------------------------------


def test_reserve_hands_out_low_blocks_first_and_only_what_is_missing():
    p = pool()
    t = BlockTable()
    p.reserve(t, 9)
    assert t.blocks == [1, 2, 3]  # block 0 is scratch, never handed out
    assert t.length == 0  # reserving makes room; the engine sets the length after the forward
    assert p.free_blocks == 2 and p.used_blocks == 3
    p.reserve(t, 12)  # still three blocks
    assert t.blocks == [1, 2, 3] and p.free_blocks == 2
    p.reserve(t, 13)
    assert t.blocks == [1, 2, 3, 4] and p.free_blocks == 1
    p.reserve(t, 5)  # reserving less never shrinks
    assert len(t.blocks) == 4


def test_the_whole_pool_can_be_reserved_then_one_more_token_is_exhausted():
    p = pool(capacity_tokens=20, block_size=4)
    t = BlockTable()
    p.reserve(t, 20)
    assert t.blocks == [1, 2, 3, 4, 5] and p.free_blocks == 0
    with pytest.raises(PoolExhausted):
        p.reserve(t, 21)
    assert len(t.blocks) == 5


def test_reserve_is_all_or_nothing():
    p = pool(capacity_tokens=20, block_size=4)
    a, b = BlockTable(), BlockTable()
    p.reserve(a, 12)  # 3 of 5 blocks
    with pytest.raises(PoolExhausted, match="3 more blocks"):
        p.reserve(b, 12)  # needs 3, 2 free
    assert b.blocks == []  # took nothing
    assert p.free_blocks == 2
    p.reserve(b, 8)  # and the 2 free blocks are still there to take
    assert b.blocks == [4, 5] and p.free_blocks == 0


def test_a_partial_reserve_that_does_not_fit_leaves_the_table_as_it_was():
    p = pool(capacity_tokens=20, block_size=4)
    a, b = BlockTable(), BlockTable()
    p.reserve(a, 4)
    p.reserve(b, 12)
    with pytest.raises(PoolExhausted):
        p.reserve(a, 16)  # a has 1, needs 3 more, 1 free
    assert a.blocks == [1] and p.free_blocks == 1


def test_truncate_frees_the_blocks_past_the_new_end():
    p = pool()
    t = BlockTable()
    p.reserve(t, 11)
    t.length = 11
    p.truncate(t, 5)  # 5 tokens: 2 blocks
    assert t.blocks == [1, 2] and t.length == 5
    assert p.free_blocks == 3
    p.truncate(t, 8)  # above the length: nothing grows, nothing freed
    assert t.blocks == [1, 2] and t.length == 5
    p.truncate(t, 4)  # exactly one block
    assert t.blocks == [1] and t.length == 4
    p.truncate(t, 0)
    assert t.blocks == [] and t.length == 0
    assert p.free_blocks == p.num_blocks


def test_freed_blocks_are_reused():
    p = pool(capacity_tokens=20, block_size=4)
    a, b = BlockTable(), BlockTable()
    p.reserve(a, 20)
    assert p.free_blocks == 0
    a.length = 20
    p.truncate(a, 10)  # frees blocks 4 and 5
    p.reserve(b, 8)
    assert sorted(b.blocks) == [4, 5]
    assert set(a.blocks).isdisjoint(b.blocks)
    p.free(a)
    p.free(b)
    assert a.blocks == b.blocks == [] and a.length == 0
    assert p.free_blocks == p.num_blocks == 5


def test_no_block_is_ever_owned_twice():
    p = pool(capacity_tokens=64, block_size=4)
    tables = [BlockTable() for _ in range(4)]
    for step, length in enumerate([5, 9, 3, 16, 1, 12, 7]):
        t = tables[step % 4]
        p.truncate(t, 0)
        p.reserve(t, length)
        owned = [b for tb in tables for b in tb.blocks]
        assert len(owned) == len(set(owned))
        assert 0 not in owned
        assert len(owned) + p.free_blocks == p.num_blocks


# --- slot arithmetic ----------------------------------------------------------------------------


def test_slots_map_positions_through_the_block_table():
    p = pool(capacity_tokens=40, block_size=4)
    t = BlockTable(blocks=[2, 5, 3], length=12)
    positions = torch.tensor([[0, 1, 3, 4, 7, 8, 11]])
    valid = torch.ones_like(positions, dtype=torch.bool)
    # position p -> blocks[p // 4] * 4 + p % 4
    assert p.slots([t], positions, valid).tolist() == [[8, 9, 11, 20, 23, 12, 15]]


def test_invalid_positions_go_to_scratch_slot_zero():
    p = pool(capacity_tokens=40, block_size=4)
    t = BlockTable(blocks=[2, 5], length=6)
    positions = torch.tensor([[0, 5, 6, 7, 8, 30]])  # 8 and 30 lie past the table's blocks
    valid = torch.tensor([[True, True, False, False, False, False]])
    out = p.slots([t], positions, valid)
    assert out.dtype == torch.long
    assert out.tolist() == [[8, 21, 0, 0, 0, 0]]


def test_slots_of_rows_with_tables_of_different_widths():
    p = pool(capacity_tokens=40, block_size=4)
    a = BlockTable(blocks=[7], length=3)
    b = BlockTable(blocks=[1, 9, 4], length=10)
    empty = BlockTable()
    positions = torch.tensor([[0, 2, 9], [0, 5, 9], [0, 1, 2]])
    valid = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert p.slots([a, b, empty], positions, valid).tolist() == [
        [28, 30, 0],
        [4, 37, 17],
        [0, 0, 0],
    ]


# --- tensors and bytes --------------------------------------------------------------------------


def test_nothing_is_allocated_before_the_first_forward():
    p = pool()
    assert p.kv == [None] * p.layers  # allocated per layer at its first update
    assert p.nbytes() == 0
    assert p.bytes_per_token() == 0.0


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_allocate_makes_per_layer_slot_tensors_and_measures_their_bytes(dtype, itemsize):
    layers, kv_heads, head_dim, block, blocks = 3, 2, 8, 4, 16
    p = pool(capacity_tokens=block * blocks, block_size=block, layers=layers, dtype=dtype)
    p.allocate(kv_heads, head_dim)
    slots = (blocks + 1) * block  # the scratch block is allocated on top
    assert len(p.kv) == layers
    for t in p.kv:
        assert t.shape == (slots, 2, kv_heads * head_dim)  # keys and values side by side
        assert t.dtype == dtype and t.device == CPU
    theoretical = 2 * layers * kv_heads * head_dim * itemsize
    assert p.theoretical_bytes_per_token() == theoretical
    assert p.nbytes() == slots * theoretical
    assert p.bytes_per_token() == pytest.approx(theoretical * (blocks + 1) / blocks)
    assert p.bytes_per_token() <= 1.25 * theoretical


def test_allocate_is_done_once():
    p = pool()
    p.allocate(2, 8)
    kv = list(p.kv)
    p.allocate(4, 16)  # a second call changes nothing
    assert all(a is b for a, b in zip(p.kv, kv))
    assert (p.kv_heads, p.head_dim) == (2, 8)


# --- BatchView: one forward's window onto the pool ----------------------------------------------


def test_batch_view_positions_mask_and_slots_for_rows_at_different_lengths():
    p = pool(capacity_tokens=40, block_size=4, layers=1)
    a, b = BlockTable(), BlockTable()
    p.reserve(a, 7)  # a holds 5 tokens and appends 2
    p.reserve(b, 3)  # b holds 2 tokens and appends 1 (one padding column)
    a.length, b.length = 5, 2
    view = BatchView(p, [a, b], past=[5, 2], new=[2, 1], n=2)
    assert view.positions.tolist() == [[5, 6], [2, 3]]
    assert view.length == 7 and view.get_seq_length() == 5
    mask = view.attention_mask(torch.float32)
    assert mask.shape == (2, 1, 2, 7)
    allowed = mask[:, 0] == 0
    # a query at position q sees columns 0..q of its own row
    assert allowed[0, 0].tolist() == [True] * 6 + [False]
    assert allowed[0, 1].tolist() == [True] * 7
    assert allowed[1, 0].tolist() == [True] * 3 + [False] * 4
    assert (mask[~(mask == 0)] == torch.finfo(torch.float32).min).all()
    # writes: a's positions 5, 6 in its second block; b's padding column goes to scratch slot 0
    assert view.write_idx.tolist() == [a.blocks[1] * 4 + 1, a.blocks[1] * 4 + 2, b.blocks[0] * 4 + 2, 0]


def test_batch_view_update_writes_new_keys_in_place_and_reads_each_row_back():
    heads, dim = 2, 3
    p = pool(capacity_tokens=40, block_size=4, layers=1)
    a, b = BlockTable(), BlockTable()
    # first forward: a writes 3 tokens, b writes 1
    p.reserve(a, 3)
    p.reserve(b, 1)
    k1 = torch.randn(2, heads, 3, dim)
    v1 = torch.randn(2, heads, 3, dim)
    view = BatchView(p, [a, b], past=[0, 0], new=[3, 1], n=3)
    keys, values = view.update(k1, v1, 0)
    assert p.kv_heads == heads and p.head_dim == dim  # allocated on first use
    assert keys.shape == values.shape == (2, heads, 3, dim)
    torch.testing.assert_close(keys[0], k1[0])
    torch.testing.assert_close(values[0], v1[0])
    torch.testing.assert_close(keys[1, :, :1], k1[1, :, :1])
    # b's padding columns wrote to and read from the scratch slot, never a block a session owns
    scratch = p.kv[0][0, 0].view(heads, dim)  # slot 0's keys
    for col in (1, 2):
        torch.testing.assert_close(keys[1, :, col], scratch)
    a.length, b.length = 3, 1
    # second forward: one new token each, read back with the cached ones
    p.reserve(a, 4)
    p.reserve(b, 2)
    k2 = torch.randn(2, heads, 1, dim)
    view = BatchView(p, [a, b], past=[3, 1], new=[1, 1], n=1)
    keys, _ = view.update(k2, torch.randn(2, heads, 1, dim), 0)
    assert keys.shape == (2, heads, 4, dim)
    torch.testing.assert_close(keys[0], torch.cat([k1[0], k2[0]], dim=1))
    torch.testing.assert_close(keys[1, :, :2], torch.cat([k1[1, :, :1], k2[1]], dim=1))
