"""The paged K/V tensors of every layer, and writing one step's K/V into them by slot mapping."""

from __future__ import annotations

import torch


class KVCache:
    """Per layer: ``key_cache`` and ``value_cache`` of shape [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # One block more than the block manager hands out: the scratch block, where the padding rows of a
        # CUDA-graph step write their K/V (model/cuda_graphs.py). No sequence ever owns it.
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.scratch_slot = num_blocks * block_size
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.key_cache, *self.value_cache))

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store this step's ``key``/``value`` [T, num_kv_heads, head_dim] at flat slots ``slot_mapping`` [T]."""
        num_kv_heads, head_dim = key.shape[1:]
        assert key.shape == value.shape and key.shape[0] == slot_mapping.shape[0], "one slot per token"
        self.key_cache[layer].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
        self.value_cache[layer].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks for ``block_tables`` [B, max_blocks].

        Returns two tensors of shape [B, num_kv_heads, max_blocks * block_size, head_dim].
        """
        batch, num_blocks = block_tables.shape
        flat = block_tables.reshape(-1)
        # index_select on the block dimension: several times faster than advanced indexing on the CPU
        key = self.key_cache[layer].index_select(0, flat)  # [B * max_blocks, block_size, H_kv, D]
        value = self.value_cache[layer].index_select(0, flat)
        shape = (batch, num_blocks * self.block_size, *key.shape[2:])
        return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)
