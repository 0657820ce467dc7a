"""Scheduler as a state machine over real sequences and a real block manager (no model)."""

from __future__ import annotations

import random

from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.config import LimitsConfig
from loraplex.engine.core.scheduler import Scheduler, SchedulerOutput
from loraplex.engine.core.sequence import Request, SamplingParams, Sequence, SequenceStatus

SLOTS = {"base": 1, "chatbot": 3, "code": 2, "summarization": 1}


def make_scheduler(**limits: int) -> Scheduler:
    config = LimitsConfig(
        **{
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,
            "block_size": 4,
            "num_kv_blocks": 256,
            "max_model_len": 256,
            **limits,
        }
    )
    return Scheduler(config, dict(SLOTS), BlockManager(config.num_kv_blocks, config.block_size))


def seq(request_id: str, endpoint: str = "base", prompt_len: int = 8) -> Sequence:
    return Sequence(Request(request_id, endpoint, list(range(1, prompt_len + 1))))


def run_step(scheduler: Scheduler, out: SchedulerOutput, max_tokens: int = 4) -> list[Sequence]:
    """What the engine does after a forward pass: advance, append sampled tokens, finish at max_tokens."""
    finished = []
    for chunk in out.chunks:
        samples = chunk.samples
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if samples:
            chunk.seq.output_token_ids.append(7)
            if len(chunk.seq.output_token_ids) >= max_tokens:
                scheduler.remove(chunk.seq)
                chunk.seq.status = SequenceStatus.FINISHED
                finished.append(chunk.seq)
    return finished


def test_chunked_prefill_respects_the_token_budget() -> None:
    s = make_scheduler(max_num_batched_tokens=16)
    long = seq("long", prompt_len=40)
    s.add(long)
    sizes = []
    while long.num_computed_tokens < 40:
        out = s.schedule()
        assert out.num_batched_tokens <= 16
        sizes.append(out.chunks[0].num_tokens)
        assert out.chunks[0].samples == (long.num_computed_tokens + sizes[-1] == 40)
        run_step(s, out, max_tokens=100)
    assert sizes == [16, 16, 8]


def test_decodes_are_scheduled_before_new_prefills() -> None:
    s = make_scheduler(max_num_batched_tokens=10)
    a = seq("a", prompt_len=8)
    s.add(a)
    run_step(s, s.schedule(), max_tokens=100)
    s.add(seq("b", prompt_len=30))
    out = s.schedule()
    assert out.chunks[0].seq is a and out.chunks[0].num_tokens == 1
    assert out.chunks[1].num_tokens == 9  # the rest of the budget goes to b's first chunk


def test_guaranteed_slots_and_borrowing() -> None:
    s = make_scheduler(max_num_seqs=7)
    for i in range(6):
        s.add(seq(f"code{i}", "code"))
    s.add(seq("chat0", "chatbot"))
    out = s.schedule()
    running = [c.seq.endpoint for c in out.chunks]
    # code may borrow idle capacity, but must leave chatbot's guaranteed slot for its waiting request
    assert running.count("chatbot") == 1
    assert running.count("code") == 6


def test_borrowers_are_preempted_when_an_endpoint_needs_its_slots() -> None:
    s = make_scheduler(max_num_seqs=4)
    for i in range(4):
        s.add(seq(f"code{i}", "code"))
    run_step(s, s.schedule(), max_tokens=100)
    assert s.running_per_endpoint["code"] == 4  # everything idle was borrowed
    s.add(seq("sum0", "summarization"))
    out = s.schedule()
    assert [p.seq_id for p in out.preempted] == ["code3"]
    assert any(c.seq.seq_id == "sum0" for c in out.chunks)
    assert s.running_per_endpoint["summarization"] == 1


def test_preemption_when_blocks_run_out_and_resumption() -> None:
    s = make_scheduler(num_kv_blocks=6, max_model_len=24, block_size=4)
    a, b = seq("a", prompt_len=11), seq("b", prompt_len=11)
    s.add(a)
    s.add(b)
    run_step(s, s.schedule(), max_tokens=100)  # 3 blocks each: the pool is full
    preempted = []
    for _ in range(3):
        out = s.schedule()
        preempted += out.preempted
        run_step(s, out, max_tokens=100)
    assert preempted and preempted[0] is b and b.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    s.remove(a)  # a finishes: b resumes by recomputing its prompt and its output so far
    out = s.schedule()
    assert out.chunks[0].seq is b and out.chunks[0].num_tokens == b.num_tokens


def test_random_workload_finishes_everything_without_leaks_or_starvation() -> None:
    rng = random.Random(1)
    s = make_scheduler(max_num_seqs=6, num_kv_blocks=40, max_num_batched_tokens=32, max_model_len=64)
    endpoints = list(SLOTS)
    pending = [seq(f"r{i}", rng.choice(endpoints), rng.randrange(1, 40)) for i in range(60)]
    finished: list[Sequence] = []
    steps = 0
    while pending or s.num_unfinished:
        for _ in range(rng.randrange(3)):
            if pending:
                s.add(pending.pop())
        out = s.schedule()
        assert out.num_batched_tokens <= 32 and len(s.running) <= 6
        budget_left = 32 - out.num_batched_tokens
        short_of_blocks = any(
            not s.block_manager.can_allocate(w.seq_id, min(w.num_uncomputed_tokens, budget_left)) for w in s.waiting
        )
        for endpoint, slots in SLOTS.items():
            if any(w.endpoint == endpoint for w in s.waiting) and s.running_per_endpoint[endpoint] < slots:
                # an endpoint under its guarantee waits only for the token budget or KV blocks
                assert budget_left == 0 or short_of_blocks or out.preempted, f"{endpoint} starved"
        finished += run_step(s, out, max_tokens=rng.randrange(1, 12))
        steps += 1
        assert steps < 5000, "the workload did not drain"
    assert len(finished) == 60
    assert s.block_manager.num_free_blocks == 40


def lora_seq(request_id: str, endpoint: str, prompt_len: int, max_tokens: int) -> Sequence:
    """A request of an endpoint that serves the adapter of the same name."""
    request = Request(request_id, endpoint, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))
    return Sequence(request, lora_name=endpoint)


def run_step_to_max_tokens(scheduler: Scheduler, out: SchedulerOutput) -> list[Sequence]:
    """``run_step``, each sequence finishing at its own ``max_tokens``."""
    finished = []
    for chunk in out.chunks:
        finished += run_step(scheduler, SchedulerOutput([chunk]), chunk.seq.request.params.max_tokens)
    return finished


MAX_TOKENS = 16


def _longest_starvation(slots: dict[str, int], max_loras: int, max_num_seqs: int, seed: int, steps: int) -> dict:
    """Steps, per endpoint, of the longest run in which it had a request waiting, ran below its guaranteed
    slots, and finished nothing. The first two endpoints flood (always three requests waiting, so they borrow
    every idle seat); the others send a request now and then."""
    rng = random.Random(seed)
    limits = LimitsConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=64, block_size=4, num_kv_blocks=512, max_model_len=256
    )
    s = Scheduler(limits, dict(slots), BlockManager(limits.num_kv_blocks, limits.block_size))
    s.lora_slots.max_loras = max_loras
    names = list(slots)
    flooding, occasional = names[:2], names[2:]
    run = dict.fromkeys(names, 0)
    longest = dict.fromkeys(names, 0)
    ids = iter(range(10**6))
    for _ in range(steps):
        for name in flooding:
            while sum(w.endpoint == name for w in s.waiting) < 3:
                s.add(lora_seq(f"{name}-{next(ids)}", name, rng.randrange(2, 12), rng.randrange(1, MAX_TOKENS + 1)))
        for name in occasional:
            if rng.random() < 0.1:
                s.add(lora_seq(f"{name}-{next(ids)}", name, rng.randrange(2, 12), rng.randrange(1, MAX_TOKENS + 1)))
        out = s.schedule()
        assert len(s.running) <= max_num_seqs and len(s.lora_slots.slot_of) <= max_loras
        finished = {f.endpoint for f in run_step_to_max_tokens(s, out)}
        for name in names:
            starved = any(w.endpoint == name for w in s.waiting) and s.running_per_endpoint[name] < slots[name]
            run[name] = run[name] + 1 if starved and name not in finished else 0
            longest[name] = max(longest[name], run[name])
    return longest


def test_guaranteed_slots_hold_when_adapters_outnumber_lora_slots() -> None:
    """An endpoint under its guaranteed slots whose adapter needs a LoRA slot gets one back from borrowers
    within a bounded number of steps, for every mix of adapters at, below and above ``max_loras``."""
    for trial in range(24):
        rng = random.Random(trial)
        num_adapters = rng.randrange(3, 6)
        # the flooding two may have no guarantee at all (they only borrow); the others have one or two slots
        slots = {f"a{i}": rng.randrange(0 if i < 2 else 1, 3) for i in range(num_adapters)}
        max_loras = rng.randrange(1, num_adapters + 2)
        max_num_seqs = max(sum(slots.values()), 1) + rng.randrange(0, 4)
        longest = _longest_starvation(slots, max_loras, max_num_seqs, seed=trial, steps=300)
        # A request lives at most MAX_TOKENS steps (its prefill samples the first token); an adapter waiting
        # for a slot waits at most for every other adapter's running requests to finish, twice over.
        bound = MAX_TOKENS * num_adapters * 2
        assert max(longest.values()) <= bound, (trial, slots, max_loras, max_num_seqs, longest)
