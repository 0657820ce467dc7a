"""Turning one step's logits into one token per sequence, for the whole batch at once.

Order: the grammar masks of constrained rows (structured output, ``grammar.py``); the log-probabilities of the
rows that ask for them, from those logits (a constrained row's disallowed tokens have log-probability -inf, as in
vLLM); then, in place, logit biases
(and the bans of ``min_tokens``) and penalties; then greedy rows (temperature below ``SAMPLING_EPS``) take the argmax;
sampled rows are divided by their temperature, filtered by top-k, top-p and min-p, and drawn with their own
generator. Each request owns a ``torch.Generator`` seeded from its ``seed`` and makes one draw per token from
it, over a distribution that depends on its own logits and parameters only, so the same seed and prompt give
the same tokens whatever else shares the batch.

The sampler runs on the engine loop between forward passes, so it is written for large batches: one set of
tensor ops per step, not per row, and a row with a top-k looks only at its k best candidates (``topk``)
instead of sorting the whole vocabulary. Sorting every row cost about 300 ms per step at 64 rows of the
49,152-token vocabulary on the 2-core CPU (``benchmarks/sampler_step.py``), most of a 64-sequence forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.core.sequence import SamplingParams, Sequence, TokenLogprob
from loraplex.engine.model.grammar import Masks


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """In place: each row's ``logit_bias``, and -inf on the tokens that would end a sequence that has fewer
    than ``min_tokens`` new tokens (end-of-sequence and ``stop_token_ids``), with one scatter for the batch."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for row, seq in enumerate(seqs):
        p = seq.request.params
        ended = {*eos_token_ids, *p.stop_token_ids} if len(seq.output_token_ids) < p.min_tokens else set()
        for token, value in [*p.logit_bias.items(), *((t, -torch.inf) for t in ended)]:
            rows.append(row)
            ids.append(token)
            values.append(value)
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty over the last ``repeat_last_n`` tokens (prompt included, as Ollama does);
    presence and frequency penalties over the output tokens (as OpenAI does)."""
    rep_rows: list[int] = []
    rep_ids: list[int] = []
    rep_penalty: list[float] = []
    out_rows: list[int] = []  # rows with presence or frequency penalties
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if p.repetition_penalty != 1.0 and p.repeat_last_n != 0:
            window = set(seq.token_ids if p.repeat_last_n == -1 else seq.token_ids[-p.repeat_last_n :])
            rep_rows += [row] * len(window)
            rep_ids += window
            rep_penalty += [p.repetition_penalty] * len(window)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            out_rows.append(row)
    device, dtype = logits.device, logits.dtype
    if rep_rows:
        index = (torch.tensor(rep_rows, device=device), torch.tensor(rep_ids, device=device))
        penalty = torch.tensor(rep_penalty, dtype=dtype, device=device)
        values = logits[index]
        logits[index] = torch.where(values > 0, values / penalty, values * penalty)
    if out_rows:
        outputs = [seqs[row].output_token_ids for row in out_rows]
        hit_rows = torch.tensor([i for i, ids in enumerate(outputs) for _ in ids], device=device)
        hit_ids = torch.tensor([t for ids in outputs for t in ids], device=device)
        counts = torch.zeros(len(out_rows), logits.shape[1], dtype=dtype, device=device)
        counts.index_put_((hit_rows, hit_ids), torch.ones((), dtype=dtype, device=device), accumulate=True)
        params = [seqs[row].request.params for row in out_rows]
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=dtype, device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], dtype=dtype, device=device)[:, None]
        rows = torch.tensor(out_rows, device=device)
        logits[rows] -= frequency * counts + presence * (counts > 0).to(dtype)


# A filtered row first looks at this many best candidates; it falls back to sorting its whole vocabulary only
# when its top-p / min-p cut lies further out (a flat distribution).
CANDIDATES = 256


def _top_k(params: list[SamplingParams], vocab: int) -> list[int]:
    """Each row's top-k as a candidate count (the whole vocabulary when off)."""
    return [p.top_k if 0 < p.top_k < vocab else vocab for p in params]


def _is_plain(p: SamplingParams, vocab: int) -> bool:
    """No top-k, top-p or min-p: the row draws from its whole distribution, no ordering needed."""
    return not 0 < p.top_k < vocab and p.top_p >= 1.0 and p.min_p == 0.0


def _draw(weights: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One column per row, with probability proportional to the row's weights: inverse-CDF sampling with
    one uniform from the row's own generator (one call per row; the rest is batched).

    A column of weight 0 is never drawn (the first column whose cumulative weight exceeds the target is
    taken), and zero columns appended to a row (as a wider batch does) leave its draw the same."""
    device = weights.device
    uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in generators])
    cdf = weights.cumsum(dim=-1)
    target = (uniform * cdf[:, -1])[:, None]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # a uniform just below 1 can round the target up to the total: take the last column of weight instead
    last = weights.shape[-1] - 1 - (weights > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(drawn, last)


def sample_plain(scaled: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Rows without filters draw from their whole softmax, by token id."""
    return _draw(scaled.softmax(dim=-1), generators)


def _nucleus(
    scaled: torch.Tensor, params: list[SamplingParams], width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``width`` best candidates of each row, most likely first: (weights with what the filters remove
    set to 0, token ids, whether the row's kept set lies wholly inside the candidates).

    Top-p and min-p are measured on the whole vocabulary's probabilities, not renormalised after top-k."""
    vocab, device = scaled.shape[-1], scaled.device
    if width < vocab:
        values, ids = scaled.topk(width, dim=-1)
    else:
        values, ids = scaled.sort(dim=-1, descending=True)
    probs = (values - scaled.logsumexp(dim=-1, keepdim=True)).exp()
    top_k = torch.tensor(_top_k(params, vocab), device=device)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each candidate
    cut = before >= torch.tensor([p.top_p for p in params], device=device)[:, None]
    cut |= probs < torch.tensor([p.min_p for p in params], device=device)[:, None] * probs[:, :1]
    complete = (top_k <= width) | cut[:, -1]  # the cut is monotone: past the last candidate all is cut too
    remove = cut | (torch.arange(width, device=device)[None, :] >= top_k[:, None])
    remove[:, 0] = False  # the most likely token always survives
    return probs.masked_fill(remove, 0.0), ids, complete


def sample_filtered(
    scaled: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Rows with top-k, top-p or min-p: ``CANDIDATES`` (or the largest top-k, if smaller) via ``topk``,
    then a full sort only for rows whose kept set reaches past them. Which of the two a row takes depends on
    its own logits and parameters only."""
    vocab = scaled.shape[-1]
    width = min(max(_top_k(params, vocab)), CANDIDATES)
    weights, ids, complete = _nucleus(scaled, params, width)
    narrow = complete.nonzero().squeeze(1).tolist()
    wide = (~complete).nonzero().squeeze(1).tolist()  # rare: a flat distribution
    tokens = torch.empty(scaled.shape[0], dtype=torch.long, device=scaled.device)
    if narrow:
        tokens[narrow] = _pick(weights[narrow], ids[narrow], [generators[i] for i in narrow])
    if wide:
        weights, ids, _ = _nucleus(scaled[wide], [params[i] for i in wide], vocab)
        tokens[wide] = _pick(weights, ids, [generators[i] for i in wide])
    return tokens


def _pick(weights: torch.Tensor, ids: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    choice = _draw(weights, generators)
    return ids.gather(-1, choice[:, None]).squeeze(-1)


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, counts: list[int]) -> list[TokenLogprob]:
    """Each row's token log-probability and its ``counts[row]`` most likely tokens, for the whole batch with one
    gather and one ``topk`` (as wide as the largest count).

    ``logprobs`` [R, vocab] log-softmax of the rows' raw logits; ``tokens`` [R] the tokens drawn."""
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    values, ids = logprobs.topk(max(counts), dim=-1)  # [R, k]
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(token, chosen[row], list(zip(ids[row][:count], values[row][:count], strict=True)))
        for row, (token, count) in enumerate(zip(tokens.tolist(), counts, strict=True))
    ]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the request did not ask for them


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.eos_token_ids = eos_token_ids  # what ``min_tokens`` keeps from being drawn early

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator | None]
    ) -> list[int]:
        """``logits`` [B, vocab] float32, one row per sequence; returns one token id per row."""
        return self.sample(logits, seqs, generators).token_ids

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        generators: list[torch.Generator | None],
        masks: Masks | None = None,
    ) -> SamplerOutput:
        """One token per row, and the log-probabilities of the rows that ask for them (``params.logprobs``):
        the log-softmax of the logits after the grammar masks, taken before the penalties change ``logits`` in
        place. Rows that do not ask cost nothing."""
        if masks is not None:
            masks.apply(logits)
        params = [s.request.params for s in seqs]
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = logits[asking].log_softmax(dim=-1) if asking else None  # [len(asking), vocab]
        apply_logit_bias(logits, seqs, self.eos_token_ids)
        apply_penalties(logits, seqs)
        tokens = _draw_tokens(logits, params, generators)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw is not None:
            counts = [params[i].logprobs for i in asking]
            for row, logprob in zip(asking, token_logprobs(raw, tokens[asking], counts), strict=True):
                logprobs[row] = logprob
        return SamplerOutput(tokens.tolist(), logprobs)


def _draw_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Greedy rows take the argmax; the others are tempered and drawn, plain or filtered. [B] token ids."""
    greedy = logits.argmax(dim=-1)  # [B]
    tokens = greedy.clone()
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    plain = [i for i in sampled if _is_plain(params[i], logits.shape[-1])]
    filtered = [i for i in sampled if not _is_plain(params[i], logits.shape[-1])]
    if plain:
        tokens[plain] = sample_plain(_scaled(logits, params, plain, greedy), [generators[i] for i in plain])
    if filtered:
        scaled = _scaled(logits, params, filtered, greedy)
        tokens[filtered] = sample_filtered(scaled, [params[i] for i in filtered], [generators[i] for i in filtered])
    return tokens


def _scaled(logits: torch.Tensor, params: list[SamplingParams], rows: list[int], argmax: torch.Tensor) -> torch.Tensor:
    """The rows' logits divided by their temperatures.

    A row whose softmax would not be finite (an inf or NaN logit, or one that overflows when divided, as after
    a tiny repetition penalty) becomes a point mass at its ``argmax``: it draws that token, never garbage."""
    temperature = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype, device=logits.device)
    scaled = logits[rows] / temperature[:, None]  # [len(rows), vocab]
    bad = (~scaled.amax(dim=-1).isfinite()).nonzero().squeeze(1)  # amax is NaN if any logit is
    if len(bad):  # rare: inf or NaN logits
        scaled[bad] = -torch.inf
        scaled[bad, argmax[rows][bad]] = 0.0
    return scaled
