"""Block manager as a state machine: random allocate / fork / free / prefix-reuse sequences keep every
invariant; the prefix cache's keys, reuse and least-recently-used reclaiming."""

from __future__ import annotations

import random

from loraplex.engine.core.block_manager import BlockManager, block_keys


def check_invariants(bm: BlockManager) -> None:
    referenced: dict[int, int] = {}
    for table in bm.block_tables.values():
        for block in table:
            referenced[block] = referenced.get(block, 0) + 1
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == referenced.get(block, 0)
        unreferenced = bm.ref_counts[block] == 0
        assert (block in bm.free_blocks) == (unreferenced and block not in bm.key_of)
        assert (block in bm.evictable) == (unreferenced and block in bm.key_of)
    assert len(set(bm.free_blocks)) == len(bm.free_blocks)
    assert {bm.cached[key] for key in bm.key_of.values()} == set(bm.key_of)
    assert all(bm.key_of[block] == key for key, block in bm.cached.items())


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
        elif op < 0.7 and lengths:  # cache a sequence's full blocks under keys of its own made-up tokens
            seq = rng.choice(sorted(lengths))
            full = lengths[seq] // bm.block_size
            bm.remember(seq, [f"{seq}-{i}-{lengths[seq]}".encode() for i in range(full)])
        elif op < 0.8 and bm.cached:  # a new sequence reuses a cached prefix, then grows
            seq = f"p{step}"
            keys = list(bm.cached)[: rng.randrange(1, 4)]
            reused = bm.reuse_prefix(seq, keys)
            if reused:
                lengths[seq] = reused
        elif lengths:
            seq = rng.choice(sorted(lengths))
            bm.free(seq)
            del lengths[seq]
        check_invariants(bm)
    for seq in list(lengths):
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm)


def test_block_keys_chain_and_are_salted_by_adapter() -> None:
    tokens = list(range(40))
    keys = block_keys(b"", tokens, 16, [])
    assert len(keys) == 2  # the partial third block has no key
    assert block_keys(b"", tokens[:16] + [99] * 16, 16, [])[0] == keys[0]
    assert block_keys(b"", [99, *tokens[1:]], 16, [])[1] != keys[1]  # a block's key depends on all before it
    assert block_keys(b"code#2", tokens, 16, []) != keys
    assert block_keys(b"", tokens, 16, keys[:1]) == keys  # extending gives the same keys


def test_a_freed_prefix_is_reused_then_reclaimed_deepest_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    keys = block_keys(b"", list(range(12)), 4, [])
    assert bm.may_allocate("a", 12)
    bm.remember("a", keys)
    table = list(bm.block_tables["a"])
    bm.free("a")
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 3
    check_invariants(bm)
    assert bm.reuse_prefix("b", [*keys[:2], b"missing"]) == 8
    assert bm.block_tables["b"] == table[:2] and bm.num_free_blocks == 2
    assert bm.reuse_prefix("c", keys[:1]) == 4  # shared by two live sequences
    assert bm.ref_counts[table[0]] == 2
    check_invariants(bm)
    assert bm.may_allocate("d", 8)  # the empty block, then the cached third block is reclaimed
    assert keys[2] not in bm.cached and keys[1] in bm.cached
    check_invariants(bm)
    for seq in ("b", "c", "d"):
        bm.free(seq)
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    check_invariants(bm)
