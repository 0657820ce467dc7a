"""Which sequences run this step: continuous batching with per-endpoint slots, a token budget,
chunked prefill, and preemption by recompute when KV blocks run out.

Policy, in order, every step:
1. Reclaim: an endpoint below its guaranteed ``slots`` with work waiting gets capacity back by preempting
   the newest sequence of an endpoint that is borrowing (running more than its slots). When what it lacks is
   a LoRA slot (every slot holds an adapter in use), the oldest resident adapter is *drained*: its borrowers
   are preempted, it admits no new sequences, and no other adapter may take a slot, until its last running
   sequence ends and the waiting endpoint's adapter takes the slot. With more adapters than ``max_loras``,
   guaranteed endpoints so take turns, each waiting at most for one adapter's running requests to finish.
2. Running sequences, oldest first, each get their next chunk (one token when decoding) within the token
   budget; when blocks run out the newest running sequence is preempted (its blocks freed, recomputed later).
3. Waiting sequences are admitted in arrival order while the budget, ``max_num_seqs``, free blocks and LoRA
   slots allow (an adapter not resident takes a free slot or the least recently used idle one).
   An endpoint below its slots is always admissible; one at or above them may borrow idle capacity only
   while enough stays free for every other endpoint that has work waiting and is below its slots. A request
   that cannot be admitted does not block requests of other endpoints behind it. With prefix caching, a
   sequence admitted from the start first takes the cached blocks of its longest cached prefix (same
   adapter) and computes only the rest; at least its last token is always computed, for its logits.
The scheduler never touches tensors.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from loraplex.engine.core.block_manager import BlockManager, block_keys
from loraplex.engine.core.config import LimitsConfig
from loraplex.engine.core.sequence import Sequence, SequenceStatus
from loraplex.engine.lora.slots import SlotTable


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled (never to embed)."""
        return not self.seq.request.embed and self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    lora_loads: list[tuple[str, int]] = field(default_factory=list)  # (adapter, slot) to write before the forward

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        limits: LimitsConfig,
        endpoint_slots: dict[str, int],
        block_manager: BlockManager,
        lora_slots: SlotTable | None = None,
    ) -> None:
        self.max_num_seqs = limits.max_num_seqs
        self.max_num_batched_tokens = limits.max_num_batched_tokens
        self.endpoint_slots = endpoint_slots  # endpoint -> guaranteed concurrency
        self.block_manager = block_manager
        self.lora_slots = lora_slots or SlotTable(limits.max_loras)  # adapter residency
        self.prefix_caching = limits.prefix_caching
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens whose blocks were reused
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.running_per_endpoint: Counter[str] = Counter()
        # While an endpoint below its slots waits for a LoRA slot: the adapter it needs, and the resident one
        # being drained to make room for it. Waiters take turns by when their adapter last held a slot.
        self.slot_waiter: str | None = None
        self.draining: str | None = None
        self.num_steps = 0
        self.last_resident: dict[str, int] = {}  # adapter -> the last step it held a slot

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self._stop_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq.seq_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._reclaim_slots(out)
        num_reclaimed = len(out.preempted)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if len(out.preempted) == num_reclaimed:  # admitting while blocks run short would thrash
            self._admit_waiting(out, budget)
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preemption by recompute: drop the KV blocks; the sequence re-enters at the front of the queue."""
        self._stop_running(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.running_per_endpoint[seq.endpoint] -= 1
        if seq.lora_name is not None:
            self.lora_slots.release(seq.lora_name)

    def _start_running(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq.lora_name is not None:
            resident = seq.lora_name in self.lora_slots.slot_of
            acquired = self.lora_slots.acquire(seq.lora_name)
            assert acquired is not None, "checked with can_acquire"
            seq.lora_slot = acquired[0]
            if not resident:
                out.lora_loads.append((seq.lora_name, seq.lora_slot))
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.running_per_endpoint[seq.endpoint] += 1

    def _is_borrowing(self, endpoint: str) -> bool:
        return self.running_per_endpoint[endpoint] > self.endpoint_slots.get(endpoint, 0)

    def _is_below_guarantee(self, endpoint: str) -> bool:
        return self.running_per_endpoint[endpoint] < self.endpoint_slots.get(endpoint, 0)

    def _reclaim_slots(self, out: SchedulerOutput) -> None:
        starved = {s.endpoint for s in self.waiting if self._is_below_guarantee(s.endpoint)}
        for endpoint in starved:
            while (
                len(self.running) >= self.max_num_seqs
                and self.running_per_endpoint[endpoint] < self.endpoint_slots[endpoint]
            ):
                borrowers = [s for s in self.running if self._is_borrowing(s.endpoint)]
                if not borrowers:
                    break
                self._preempt(borrowers[-1], out)  # the freed capacity is taken in _admit_waiting
        self._reclaim_lora_slot(out)

    def _reclaim_lora_slot(self, out: SchedulerOutput) -> None:
        """Drain a resident adapter for a waiting request of an endpoint below its slots whose adapter is not
        resident while no LoRA slot is empty (see the module docstring); a no-op once none waits."""
        slots = self.lora_slots
        self.num_steps += 1
        self.last_resident.update(dict.fromkeys(slots.slot_of, self.num_steps))
        blocked = min(
            (
                s
                for s in self.waiting
                if s.lora_name is not None
                and s.lora_name not in slots.slot_of
                and len(slots.slot_of) >= slots.max_loras
                and self._is_below_guarantee(s.endpoint)
            ),
            key=lambda s: self.last_resident.get(s.lora_name, 0),  # longest without a slot first; then arrival
            default=None,
        )
        self.slot_waiter = blocked.lora_name if blocked is not None else None
        if blocked is None or (self.draining not in slots.slot_of and slots.idle):
            self.draining = None  # nothing waits, or an idle adapter gives way when the waiter is admitted
            return
        if self.draining not in slots.slot_of:
            self.draining = next(iter(slots.slot_of))  # the adapter placed longest ago
        users = [s for s in self.running if s.lora_name == self.draining]
        for seq in reversed(users):  # newest first, while its endpoint borrows
            if self._is_borrowing(seq.endpoint):
                self._preempt(seq, out)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        for seq in list(self.running):
            if seq not in self.running:  # preempted earlier in this loop
                continue
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if num_tokens == 0:
                continue
            while not self.block_manager.may_allocate(seq.seq_id, seq.num_computed_tokens + num_tokens):
                self._preempt(self.running[-1], out)
                if seq.status is SequenceStatus.WAITING:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.chunks.append(ScheduledChunk(seq, num_tokens))
                budget -= num_tokens
        return budget

    def _can_admit(self, endpoint: str) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        if self.running_per_endpoint[endpoint] < self.endpoint_slots.get(endpoint, 0):
            return True
        # Keep back what other endpoints below their slots need for the requests they have waiting.
        waiting = Counter(s.endpoint for s in self.waiting if s.endpoint != endpoint)
        reserved = sum(
            min(count, max(0, self.endpoint_slots.get(e, 0) - self.running_per_endpoint[e]))
            for e, count in waiting.items()
        )
        return len(self.running) + 1 + reserved <= self.max_num_seqs

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            if not self._can_admit(seq.endpoint):
                continue
            if seq.lora_name is not None and not self._may_take_lora_slot(seq.lora_name):
                continue  # every adapter slot is held by running sequences (or drained); others may still fit
            if self.prefix_caching and seq.num_computed_tokens == 0 and not seq.request.embed:
                self._reuse_prefix(seq)  # (an embedding needs every prompt token's hidden state: no reuse)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.may_allocate(seq.seq_id, seq.num_computed_tokens + num_tokens):
                self.block_manager.free(seq.seq_id)  # the reused blocks go back to the cache
                seq.num_computed_tokens = 0
                return  # out of KV blocks: wait for running sequences to finish
            if self.prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_computed_tokens
                if not seq.output_token_ids:  # first admission: what the client's usage reports
                    seq.num_cached_tokens = seq.num_computed_tokens
            self._start_running(seq, out)
            out.chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens

    def _may_take_lora_slot(self, name: str) -> bool:
        if name == self.draining:
            return False
        if self.slot_waiter is not None and name != self.slot_waiter and name not in self.lora_slots.slot_of:
            return False  # a freed slot is kept for the endpoint that waits for it
        return self.lora_slots.can_acquire(name)

    def _reuse_prefix(self, seq: Sequence) -> None:
        block_size = self.block_manager.block_size
        seq.block_keys = block_keys(seq.cache_salt, seq.token_ids, block_size, seq.block_keys)
        usable = (seq.num_tokens - 1) // block_size  # the last token is computed again: its logits are sampled
        seq.num_computed_tokens = self.block_manager.reuse_prefix(seq.seq_id, seq.block_keys[:usable])

    def remember_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """After a step that computed ``num_new_tokens`` more of ``seq``: cache its newly completed blocks."""
        block_size = self.block_manager.block_size
        full = seq.num_computed_tokens // block_size
        if not self.prefix_caching or full == (seq.num_computed_tokens - num_new_tokens) // block_size:
            return
        if len(seq.block_keys) < full:
            seq.block_keys = block_keys(seq.cache_salt, seq.token_ids[: full * block_size], block_size, seq.block_keys)
        self.block_manager.remember(seq.seq_id, seq.block_keys[:full])
