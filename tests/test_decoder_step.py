"""The CPU kernels' decoder step (model/decoder_step.py) gives transformers' hidden states to the bit."""

from __future__ import annotations

import torch

from loraplex.engine.core.sequence import Request, SamplingParams
from loraplex.engine.model.decoder_step import LlamaDecoderStep

ENDPOINTS = ["base", "chatbot", "code", "summarization"]


def test_each_step_equals_transformers_forward_to_the_bit(make_engine) -> None:
    """Prefill chunks and decodes of the base and three adapters in one step, then decode-only steps: every
    step's hidden states and logits through the fused step equal transformers' forward over the same inputs."""
    engine = make_engine(max_num_batched_tokens=48)  # the prompts go in chunks, beside decodes
    runner = engine.runner
    step = runner.decoder_step
    assert isinstance(step, LlamaDecoderStep), "the default model on the CPU kernels takes the fused step"
    for i in range(8):
        prompt = list(range(2000 + 7 * i, 2000 + 7 * i + 10 + 9 * i))
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        engine.add_request(Request(f"r{i}", ENDPOINTS[i % 4], prompt, params))
    prepare, compared = runner.prepare_inputs, []

    def prepare_and_compare(chunks):
        inputs = prepare(chunks)
        # the same K/V are written to the same slots by both passes, so the second reads what the first wrote
        runner.decoder_step = None
        want_logits, want_hidden = runner.execute(inputs)
        runner.decoder_step = step
        got_logits, got_hidden = runner.execute(inputs)
        assert torch.equal(got_hidden, want_hidden) and torch.equal(got_logits, want_logits)
        compared.append((inputs.attn_metadata.num_decode_tokens, len(inputs.attn_metadata.prefills)))
        return inputs

    runner.prepare_inputs = prepare_and_compare
    while engine.has_unfinished():
        engine.step()
    assert any(decodes and prefills for decodes, prefills in compared), "a step mixed decodes and prompt chunks"
    assert any(not prefills for _, prefills in compared), "decode-only steps ran"


def test_other_models_keep_transformers_forward(make_engine) -> None:
    engine = make_engine(model={"fused_forward": False})
    assert engine.runner.decoder_step is None
    engine = make_engine(model={"cpu_kernels": False})
    assert engine.runner.decoder_step is None
