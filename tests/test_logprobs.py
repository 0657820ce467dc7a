"""The batched sampler's log-probabilities: the raw logits' log-softmax for the rows that ask, none for the
others, and the tokens drawn the same whether a row asks or not."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import Request, SamplingParams, Sequence
from loraplex.engine.model.sampling import Sampler

VOCAB = 1000
PARAMS = [
    SamplingParams(temperature=0.7, top_k=50, repetition_penalty=1.5, logprobs=3, seed=1),
    SamplingParams(),  # greedy, no logprobs
    SamplingParams(presence_penalty=1.5, frequency_penalty=1.0, logprobs=0),
    SamplingParams(temperature=1.0, logprobs=20),
]


def seqs_of(params: list[SamplingParams]) -> list[Sequence]:
    seqs = [Sequence(Request(f"r{i}", "base", [1, 2, 3], p)) for i, p in enumerate(params)]
    for s in seqs:
        s.output_token_ids = [5, 6, 6]  # penalised tokens: the logprobs must not see the penalties
    return seqs


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(len(PARAMS))]


def test_logprobs_are_the_raw_log_softmax_for_the_rows_that_ask_only() -> None:
    logits = torch.randn(len(PARAMS), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 5] = logits.max(dim=-1).values + 0.5  # the penalised token is every row's most likely, narrowly
    out = Sampler().sample(logits.clone(), seqs_of(PARAMS), generators())
    raw = logits.log_softmax(dim=-1)
    assert out.logprobs[1] is None
    for row in (0, 2, 3):
        logprob, k = out.logprobs[row], PARAMS[row].logprobs
        assert logprob.token_id == out.token_ids[row]
        assert logprob.logprob == pytest.approx(raw[row, logprob.token_id].item(), abs=1e-6)
        values, ids = raw[row].topk(k)
        assert [t for t, _ in logprob.top] == ids.tolist()
        assert [v for _, v in logprob.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[0].top[0][0] == 5, "penalised row 0: token 5 stays the most likely in the raw logprobs"
    assert out.token_ids[2] != 5, "the greedy row's penalties moved its token off 5 (its logprob is still raw)"


def test_asking_for_logprobs_changes_no_token() -> None:
    logits = torch.randn(len(PARAMS), VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    asking = Sampler().sample(logits.clone(), seqs_of(PARAMS), generators()).token_ids
    quiet = [dataclasses.replace(p, logprobs=None) for p in PARAMS]
    assert Sampler()(logits.clone(), seqs_of(quiet), generators()) == asking


@pytest.mark.parametrize("count", [-1, 21])
def test_a_logprobs_count_outside_0_to_20_is_refused_by_name(count: int) -> None:
    with pytest.raises(RequestError, match=r"logprobs = .* use 0 to 20"):
        SamplingParams(logprobs=count)
