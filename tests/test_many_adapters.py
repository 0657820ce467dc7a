"""Many adapters, few slots: 20 registered adapters, max_loras = 4, all requested at once.

Every request must complete and equal transformers + PEFT run alone with its adapter, token for token, while
adapters are evicted (least recently used, never while a running request uses them) and reloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.make_random import make_adapter
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import AdapterError, UnknownEndpointError
from loraplex.engine.core.sequence import Request, SamplingParams

NUM_ADAPTERS = 20
NEW_TOKENS = 8
TARGET_SETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    dirs = {}
    for i in range(NUM_ADAPTERS):
        name = f"lora{i:02d}"
        rank = (2, 4, 8)[i % 3]
        make_adapter(
            root / name,
            r=rank,
            lora_alpha=2 * rank,
            targets=TARGET_SETS[i % 3],
            use_rslora=i % 2 == 1,
            seed=100 + i,
            std=0.05,
        )
        dirs[name] = root / name
    return dirs


def test_twenty_adapters_through_four_slots_match_peft(make_engine, model_dir: Path, adapter_dirs) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine: LLMEngine = make_engine(max_loras=4, max_lora_rank=16)
    for name, path in adapter_dirs.items():
        engine.add_adapter(engine.lora.read(name, path))
    ids = engine.encode_prompt("A good tip for writing clean code is")
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [Request(f"r{i}", name, list(ids), params) for i, name in enumerate(adapter_dirs)]
    requests += [Request("base", "base", list(ids), params)]
    results = engine.generate(requests)
    assert engine.block_manager.num_used_blocks == 0
    assert len(engine.lora.slot_of) == 4 and not engine.lora.slots.refs, "slots full, no reference held"

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapter_dirs)
    oracle = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        oracle.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    oracle.eval()
    x = torch.tensor([ids])
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
    distinct = set()
    with torch.inference_mode():
        for request in requests[:-1]:
            oracle.set_adapter(request.endpoint)
            want = oracle.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(ids) :].tolist()
            got = [t for o in results[request.request_id] for t in o.new_token_ids]
            assert got == want, f"{request.endpoint}: engine {got} vs PEFT {want}"
            distinct.add(tuple(got))
    assert len(distinct) > 1, "the adapters should not all produce the same text"


def test_unloading_keeps_in_flight_requests_and_refuses_new_ones(make_engine, adapter_dirs) -> None:
    engine: LLMEngine = make_engine(max_loras=2, max_lora_rank=16)
    path = adapter_dirs["lora01"]
    engine.add_adapter(engine.lora.read("extra", path))
    with pytest.raises(AdapterError, match="already served"):
        engine.add_adapter(engine.lora.read("extra", path))
    ids = engine.encode_prompt("Hello there, how are you today?")
    engine.add_request(Request("inflight", "extra", ids, SamplingParams(max_tokens=8, ignore_eos=True)))
    engine.step()
    engine.remove_adapter("extra")
    with pytest.raises(UnknownEndpointError):
        engine.add_request(Request("late", "extra", ids))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert sum(len(o.new_token_ids) for o in outputs) == 7  # the first token came from the step above
    assert "extra" not in engine.lora.adapters and "extra" not in engine.lora.slot_of
    assert all(not layer.slot_ranks for layer in engine.lora.layers.values()), "its slot was cleared"
