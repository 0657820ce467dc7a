"""Which KV blocks each sequence owns: a free list, reference counts and per-sequence block tables, and the
prefix cache: full blocks remembered by the hash of their tokens so a later sequence can reuse them.

Prefix caching (as vLLM's): a full block's key chains the key of the block before it with its own token ids
and a salt naming the adapter (the adapter changes K and V, so a prefix is shared only within one adapter).
A block nobody references any more keeps its key and stays reusable until it is needed for new tokens:
such blocks count as free and are reclaimed least recently used first.

Pure Python, no torch, so the allocation policy is tested as a state machine. The tensors live in
``kv_cache.py``; a block id here is an index into them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def block_keys(salt: bytes, token_ids: list[int], block_size: int, previous: list[bytes]) -> list[bytes]:
    """``previous`` extended with the keys of the further full blocks of ``token_ids``.

    A cryptographic hash: two different prefixes sharing a key would hand one request another's K/V."""
    keys = list(previous)
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(keys[-1] if keys else salt, digest_size=16)
        digest.update(array("q", token_ids[start : start + block_size]).tobytes())
        keys.append(digest.digest())
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))  # unreferenced and holding nothing reusable
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_tables: dict[str, list[int]] = {}  # sequence id -> block ids in token order
        self.cached: dict[bytes, int] = {}  # prefix cache: block key -> block
        self.key_of: dict[int, bytes] = {}  # block -> its key, for blocks in the prefix cache
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached and unreferenced, least recent first

    @property
    def num_free_blocks(self) -> int:
        """Blocks new tokens can take: empty ones and cached ones nobody references."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks ``seq_id`` must still get so that ``num_tokens`` tokens fit."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self.free_blocks)

    def may_allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; False (and no change) if blocks run out."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.num_free_blocks:
            return False
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(needed):
            if self.free_blocks:
                block = self.free_blocks.popleft()
            else:  # reclaim the least recently used cached block
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.key_of.pop(block)]
            assert self.ref_counts[block] == 0, f"block {block} on the free list is referenced"
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks that replay a workload); blocks in use stay with their owners."""
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        self.cached.clear()
        self.key_of.clear()

    def reuse_prefix(self, seq_id: str, keys: list[bytes]) -> int:
        """Give a sequence with no blocks yet the cached blocks of its longest cached prefix, in order of
        ``keys``; returns how many tokens they hold."""
        assert seq_id not in self.block_tables, f"{seq_id} already has blocks"
        table: list[int] = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            table.append(block)
        if table:
            self.block_tables[seq_id] = table
        return len(table) * self.block_size

    def remember(self, seq_id: str, keys: list[bytes]) -> None:
        """Enter ``seq_id``'s first ``len(keys)`` blocks (full, their K/V computed) into the prefix cache."""
        table = self.block_tables[seq_id]
        for key, block in zip(keys, table, strict=False):
            if block not in self.key_of and key not in self.cached:
                self.cached[key] = block
                self.key_of[block] = key

    def fork(self, parent_id: str, child_id: str) -> None:
        """Share every block of ``parent_id`` with ``child_id`` (one more reference each)."""
        assert child_id not in self.block_tables, f"{child_id} already has blocks"
        table = self.block_tables[parent_id]
        for block in table:
            self.ref_counts[block] += 1
        self.block_tables[child_id] = list(table)

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s references; a block nobody references goes back on the free list, or, if it is in
        the prefix cache, stays there as reclaimable."""
        for block in reversed(self.block_tables.pop(seq_id, ())):  # a prefix's deepest blocks are reclaimed first
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None  # most recently used last
                else:
                    self.free_blocks.append(block)

    def slot(self, seq_id: str, position: int) -> int:
        """Flat cache index of token ``position`` of ``seq_id``: block id * block_size + offset."""
        table = self.block_tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
