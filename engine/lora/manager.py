"""Attaching multi-LoRA layers to the base model and assigning adapters to slots.

The layers are attached before the model runs any forward pass: a bitsandbytes 4-bit layer repacks its
weight on its first forward, and wrapping after that has been seen to corrupt outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.errors import AdapterError
from engine.lora.config import LORA_TARGETS, LoRAAdapter, load_adapter
from engine.lora.layers import LoRABatch, MultiLoRALinear


class LoRAManager:
    """Owns the multi-LoRA layers of one model and which adapter sits in which slot."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.batch = LoRABatch()
        self.layers: dict[str, MultiLoRALinear] = {}
        self.adapters: dict[str, LoRAAdapter] = {}  # registered, by name
        self.slot_of: dict[str, int] = {}  # resident adapter name -> slot (1..max_loras)
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

    def register(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read and validate an adapter; it is not resident until ``activate``."""
        adapter = load_adapter(name, path, self.module_shapes, self.max_lora_rank)
        self.adapters[name] = adapter
        return adapter

    def activate(self, name: str) -> int:
        """Write a registered adapter into a free slot and return the slot."""
        if name in self.slot_of:
            return self.slot_of[name]
        if name not in self.adapters:
            raise AdapterError(f"adapter {name!r} is not registered")
        free = sorted(set(range(1, self.max_loras + 1)) - set(self.slot_of.values()))
        if not free:
            raise AdapterError(f"no free LoRA slot for {name!r}: all {self.max_loras} (limits.max_loras) are in use")
        slot, adapter = free[0], self.adapters[name]
        for module, lora_a in adapter.lora_a.items():
            self.layers[module].set_lora(slot, lora_a, adapter.lora_b[module], adapter.scaling)
        self.slot_of[name] = slot
        return slot

    def deactivate(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        for module in self.adapters[name].lora_a:
            self.layers[module].reset_lora(slot)
