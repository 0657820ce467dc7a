"""Which KV blocks each sequence owns: a free list, reference counts and per-sequence block tables.

Pure Python, no torch, so the allocation policy is tested as a state machine. The tensors live in
``kv_cache.py``; a block id here is an index into them.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_tables: dict[str, list[int]] = {}  # sequence id -> block ids in token order

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks ``seq_id`` must still get so that ``num_tokens`` tokens fit."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self.free_blocks)

    def may_allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens; False (and no change) if blocks run out."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > len(self.free_blocks):
            return False
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(needed):
            block = self.free_blocks.popleft()
            assert self.ref_counts[block] == 0, f"block {block} on the free list is referenced"
            self.ref_counts[block] = 1
            table.append(block)
        return True

    def fork(self, parent_id: str, child_id: str) -> None:
        """Share every block of ``parent_id`` with ``child_id`` (one more reference each)."""
        assert child_id not in self.block_tables, f"{child_id} already has blocks"
        table = self.block_tables[parent_id]
        for block in table:
            self.ref_counts[block] += 1
        self.block_tables[child_id] = list(table)

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s references; blocks nobody references go back on the free list."""
        for block in self.block_tables.pop(seq_id, ()):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def slot(self, seq_id: str, position: int) -> int:
        """Flat cache index of token ``position`` of ``seq_id``: block id * block_size + offset."""
        table = self.block_tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
