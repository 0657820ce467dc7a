"""Block manager as a state machine: random allocate / fork / free sequences keep every invariant."""

from __future__ import annotations

import random

from engine.block_manager import BlockManager


def check_invariants(bm: BlockManager) -> None:
    referenced: dict[int, int] = {}
    for table in bm.block_tables.values():
        for block in table:
            referenced[block] = referenced.get(block, 0) + 1
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == referenced.get(block, 0)
        assert (block in bm.free_blocks) == (bm.ref_counts[block] == 0)
    assert len(set(bm.free_blocks)) == len(bm.free_blocks)


def test_allocate_grows_by_whole_blocks_and_maps_slots() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.may_allocate("a", 5)
    assert len(bm.block_tables["a"]) == 2
    assert bm.may_allocate("a", 8)  # still fits in two blocks
    assert len(bm.block_tables["a"]) == 2
    first, second = bm.block_tables["a"]
    assert bm.slot("a", 0) == first * 4
    assert bm.slot("a", 6) == second * 4 + 2


def test_allocation_fails_without_partial_change() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.may_allocate("a", 4)
    assert not bm.can_allocate("b", 3)
    assert not bm.may_allocate("b", 3)
    assert "b" not in bm.block_tables and bm.num_free_blocks == 1


def test_fork_shares_blocks_until_the_last_reference_goes() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.may_allocate("parent", 4)
    bm.fork("parent", "child")
    assert all(bm.ref_counts[b] == 2 for b in bm.block_tables["parent"])
    bm.free("parent")
    assert bm.num_free_blocks == 2
    bm.free("child")
    assert bm.num_free_blocks == 4
    check_invariants(bm)


def test_random_operations_keep_invariants_and_free_everything() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    lengths: dict[str, int] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.5:
            seq = f"s{rng.randrange(12)}"
            new_len = lengths.get(seq, 0) + rng.randrange(1, 9)
            if bm.may_allocate(seq, new_len):
                lengths[seq] = new_len
        elif op < 0.6 and lengths:
            parent = rng.choice(sorted(lengths))
            child = f"f{step}"
            bm.fork(parent, child)
            lengths[child] = lengths[parent]
        elif lengths:
            seq = rng.choice(sorted(lengths))
            bm.free(seq)
            del lengths[seq]
        check_invariants(bm)
    for seq in list(lengths):
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm)
