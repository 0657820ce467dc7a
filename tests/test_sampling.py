"""The batched sampler against per-row references: which tokens each filter keeps, how often each is drawn,
penalties, and a row's token not depending on what else is in the batch."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.core.sequence import Request, SamplingParams, Sequence
from loraplex.engine.model.sampling import CANDIDATES, Sampler, _draw, _nucleus, apply_penalties, sample_filtered

VOCAB = 1000


def kept_reference(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Token ids one row keeps, computed the slow, obvious way over its fully sorted softmax."""
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for rank, token in enumerate(order):
        prob = probs[token].item()
        too_deep = p.top_k and rank >= p.top_k
        if rank > 0 and (too_deep or mass >= p.top_p or prob < p.min_p * probs[order[0]].item()):
            continue
        kept.add(token)
        mass += prob
    return kept


def seq(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None) -> Sequence:
    s = Sequence(Request("r", "base", prompt or [1, 2, 3], params))
    s.output_token_ids = list(output or [])
    return s


PARAMS = [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("scale", [4.0, 0.05])  # peaked rows fit the candidates; flat rows need the full sort
def test_kept_tokens_equal_the_per_row_reference(scale: float) -> None:
    logits = torch.randn(len(PARAMS), VOCAB, generator=torch.Generator().manual_seed(0)) * scale
    weights, ids, complete = _nucleus(logits, PARAMS, min(VOCAB, CANDIDATES))
    for row, p in enumerate(PARAMS):
        if not complete[row]:  # the kept set reaches past the candidates: check the full-sort path instead
            weights_row, ids_row, full = _nucleus(logits[row : row + 1], [p], VOCAB)
            assert full.all()
            got = set(ids_row[0][weights_row[0] > 0].tolist())
        else:
            got = set(ids[row][weights[row] > 0].tolist())
        assert got == kept_reference(logits[row], p), f"row {row}: {p}"
    if scale < 1:
        assert not complete[1], "a flat row with top_p 0.5 keeps more than the candidates: the wide path ran"


def test_draws_follow_the_kept_probabilities() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-6] * (VOCAB - 4)))
    p = SamplingParams(temperature=1.0, top_k=3)
    draws = [sample_filtered(logits[None], [p], [torch.Generator().manual_seed(i)]).item() for i in range(3000)]
    assert set(draws) == {0, 1, 2}
    expected = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    freq = torch.tensor([draws.count(t) / len(draws) for t in range(3)])
    assert torch.allclose(freq, expected, atol=0.03), freq


def test_zero_weight_columns_are_never_drawn_and_padding_does_not_change_a_draw() -> None:
    weights = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0]])
    padded = torch.cat([weights, torch.zeros(1, 7)], dim=1)
    for i in range(500):
        a = _draw(weights, [torch.Generator().manual_seed(i)]).item()
        b = _draw(padded, [torch.Generator().manual_seed(i)]).item()
        assert a in (1, 3) and a == b


def test_a_target_rounded_up_to_the_total_still_draws_a_weighted_column(monkeypatch: pytest.MonkeyPatch) -> None:
    # uniform * total can round up to the total itself; a uniform of exactly 1 produces that target
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.ones(1))
    weights = torch.tensor([[0.3, 0.7, 0.0, 0.0]])
    assert _draw(weights, [None]).item() == 1


def test_a_rows_token_does_not_depend_on_its_batch_companions() -> None:
    rng = torch.Generator().manual_seed(1)
    logits = torch.randn(6, VOCAB, generator=rng) * 3
    logits[5] *= 0.01  # a flat row: takes the full sort
    params = [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7),
        SamplingParams(temperature=1.0),  # plain
        SamplingParams(temperature=0.5, top_k=900),
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.2, min_p=0.1),
        SamplingParams(temperature=1.0, top_p=0.95),
    ]
    seqs = [seq(p) for p in params]
    together = Sampler()(logits.clone(), seqs, [torch.Generator().manual_seed(100 + i) for i in range(6)])
    for row in range(6):
        alone = Sampler()(logits[row : row + 1].clone(), [seqs[row]], [torch.Generator().manual_seed(100 + row)])
        assert alone == [together[row]], f"row {row}"


def test_top_k_one_and_min_p_one_are_greedy() -> None:
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(2))
    for p in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, min_p=1.0)):
        got = Sampler()(
            logits.clone(), [seq(p) for _ in range(8)], [torch.Generator().manual_seed(i) for i in range(8)]
        )
        assert got == logits.argmax(-1).tolist()


def test_penalties_equal_the_per_row_loop() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(repetition_penalty=1.3, repeat_last_n=4),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, repeat_last_n=-1, frequency_penalty=-0.5),
    ]
    seqs = [seq(p, prompt=[5, 6, 7, 8, 9], output=[9, 9, 10, 5]) for p in params]
    want = logits.clone()
    for row, s in enumerate(seqs):
        p = s.request.params
        if p.repetition_penalty != 1.0:
            window = s.token_ids if p.repeat_last_n == -1 else s.token_ids[-p.repeat_last_n :]
            for t in set(window):
                v = want[row, t]
                want[row, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(s.output_token_ids):
            n = s.output_token_ids.count(t)
            want[row, t] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    got = logits.clone()
    apply_penalties(got, seqs)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[2], logits[2])


def test_rows_whose_probabilities_are_not_finite_take_their_argmax_and_only_they() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(4))
    logits[0, 7] = torch.inf
    logits[1, 11], logits[1, 12] = 3e38, 2e38  # both overflow to inf once divided by the temperature
    logits[2, 13] = torch.nan
    logits[3, 14] = torch.inf
    params = [
        SamplingParams(temperature=1.0),  # plain
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9),  # filtered
        SamplingParams(temperature=1.0, top_p=0.9),  # a finite row beside them
    ]
    seqs = [seq(p) for p in params]
    got = Sampler()(logits.clone(), seqs, [torch.Generator().manual_seed(i) for i in range(5)])
    assert got[:4] == [7, 11, 13, 14]
    alone = Sampler()(logits[4:].clone(), seqs[4:], [torch.Generator().manual_seed(4)])
    assert got[4:] == alone


def test_temperatures_below_the_sampling_eps_are_greedy() -> None:
    assert all(SamplingParams(temperature=t).is_greedy for t in (0.0, 1e-300, 1e-50, 1e-8, 9.9e-6))
    assert not any(SamplingParams(temperature=t).is_greedy for t in (1e-5, 0.7, 2.0))


@pytest.mark.parametrize("temperature", [1e-50, 1e-8, 1e-5])
def test_a_tiny_temperature_gives_the_greedy_tokens(engine, temperature: float) -> None:
    ids = engine.encode_prompt("The three primary colours are")
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    tiny = SamplingParams(max_tokens=12, ignore_eos=True, temperature=temperature, seed=3)
    results = engine.generate([Request("greedy", "chatbot", ids, greedy), Request("tiny", "chatbot", ids, tiny)])
    assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
    tokens = {name: [t for out in outputs for t in out.new_token_ids] for name, outputs in results.items()}
    assert tokens["tiny"] == tokens["greedy"]
