"""Which adapter sits in which of the ``max_loras`` slots: reference counts and least-recently-used eviction.

Pure Python, so the scheduler can decide residency without touching tensors; the engine then writes the
weights of newly placed adapters into the layers before the forward pass that first uses them. A placement
whose write fails is discarded, so no forward pass reads a half-written slot and the next use writes it again.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class SlotTable:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.slot_of: dict[str, int] = {}  # resident adapter -> slot (1..max_loras)
        self.refs: Counter[str] = Counter()  # adapter -> running sequences using it
        self.idle: OrderedDict[str, None] = OrderedDict()  # resident, unreferenced adapters, least recent first

    def can_acquire(self, name: str) -> bool:
        return name in self.slot_of or len(self.slot_of) < self.max_loras or bool(self.idle)

    def acquire(self, name: str) -> tuple[int, str | None] | None:
        """Reference ``name``'s slot, placing it first if needed.

        Returns (slot, evicted adapter or None), or None when every slot is held by a running sequence.
        ``slot`` must be (re)loaded when ``name`` was not resident before the call.
        """
        evicted = None
        if name not in self.slot_of:
            used = set(self.slot_of.values())
            free = [s for s in range(1, self.max_loras + 1) if s not in used]
            if free:
                slot = free[0]
            elif self.idle:
                evicted, _ = self.idle.popitem(last=False)
                slot = self.slot_of.pop(evicted)
            else:
                return None
            self.slot_of[name] = slot
        self.idle.pop(name, None)
        self.refs[name] += 1
        return self.slot_of[name], evicted

    def release(self, name: str) -> None:
        assert self.refs[name] > 0, f"adapter {name!r} released more often than acquired"
        self.refs[name] -= 1
        if self.refs[name] == 0:
            del self.refs[name]
            if name in self.slot_of:  # not after ``discard``
                self.idle[name] = None  # most recently used goes last

    def evict(self, name: str) -> int | None:
        """Drop an unreferenced adapter from its slot (unload); returns the freed slot."""
        assert not self.refs[name], f"adapter {name!r} is in use"
        return self.discard(name)

    def discard(self, name: str) -> int | None:
        """Forget ``name``'s placement after its weights failed to load: its slot is free again and its next
        ``acquire`` places (and so loads) it anew. Holders still ``release`` it as usual."""
        self.idle.pop(name, None)
        return self.slot_of.pop(name, None)
