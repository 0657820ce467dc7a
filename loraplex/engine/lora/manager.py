"""Attaching multi-LoRA layers to the base model and assigning adapters to slots.

The layers are attached before the model runs any forward pass: a bitsandbytes 4-bit layer repacks its
weight on its first forward, and wrapping after that has been seen to corrupt outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraplex.engine.lora.config import LORA_TARGETS, LoRAAdapter, load_adapter
from loraplex.engine.lora.layers import LoRABatch, MultiLoRALinear
from loraplex.engine.lora.slots import SlotTable


class LoRAManager:
    """Owns the multi-LoRA layers of one model, the registered adapters, and writing them into slots."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.batch = LoRABatch()
        self.layers: dict[str, MultiLoRALinear] = {}
        self.adapters: dict[str, LoRAAdapter] = {}  # registered (in host memory), by name
        self.slots = SlotTable(max_loras)  # which registered adapters are resident, and where
        self.version = 0  # bumped whenever a slot's weights change (captured CUDA graphs go stale then)
        text_config = model.config.get_text_config()
        self.heads = (text_config.num_attention_heads, text_config.num_key_value_heads)  # for GGUF adapters
        self._attach(model, dtype)

    def _attach(self, model: nn.Module, dtype: torch.dtype) -> None:
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in LORA_TARGETS and hasattr(module, "in_features")
        ]
        for name, module in targets:
            parent_name, child = name.rsplit(".", 1)
            layer = MultiLoRALinear(module, self.max_loras, self.max_lora_rank, dtype, self.batch)
            setattr(model.get_submodule(parent_name), child, layer)
            self.layers[self._peft_name(name)] = layer

    @staticmethod
    def _peft_name(name: str) -> str:
        """``model.layers.0.self_attn.q_proj`` whatever wrapper prefix the module tree has."""
        return name[name.index("model.layers.") :] if "model.layers." in name else name

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    @property
    def slot_of(self) -> dict[str, int]:
        """Resident adapters and their slots."""
        return self.slots.slot_of

    def read(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read and validate an adapter from disk; changes nothing, so it may run off the engine thread."""
        return load_adapter(name, path, self.module_shapes, self.max_lora_rank, self.heads)

    def load_slot(self, name: str, slot: int) -> None:
        """Write a registered adapter into ``slot``, replacing whatever adapter was there before.

        Layers the adapter targets are overwritten; layers only the previous occupant targeted are cleared.
        All or nothing: if a copy fails part-way, the slot is cleared and ``name`` taken out of the slot table
        before the error propagates, so no request is served from a half-written slot and the adapter's next
        use loads it again.
        """
        try:
            self._write_slot(name, slot)
        except Exception:
            self.slots.discard(name)
            self.clear_slot(slot)
            raise

    def _write_slot(self, name: str, slot: int) -> None:
        adapter = self.adapters[name]
        self.version += 1
        for module, layer in self.layers.items():
            if module in adapter.lora_a:
                layer.set_lora(slot, adapter.lora_a[module], adapter.lora_b[module], adapter.scaling)
            elif slot in layer.slot_ranks:
                layer.reset_lora(slot)

    def clear_slot(self, slot: int) -> None:
        self.version += 1
        for layer in self.layers.values():
            if slot in layer.slot_ranks:
                layer.reset_lora(slot)
