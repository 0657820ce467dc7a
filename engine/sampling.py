"""Turning one step's logits into one token per sequence, for the whole batch at once.

Order: penalties on the raw logits, then greedy rows take the argmax; sampled rows are divided by their
temperature, filtered by top-k, top-p and min-p, and drawn with their own generator. Each request owns a
``torch.Generator`` seeded from its ``seed``, and draws exactly one noise vector per token, so the same seed
and prompt give the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty over the last ``repeat_last_n`` tokens (prompt included, as Ollama does);
    presence and frequency penalties over the output tokens (as OpenAI does)."""
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if p.repetition_penalty != 1.0 and p.repeat_last_n != 0:
            window = seq.token_ids if p.repeat_last_n == -1 else seq.token_ids[-p.repeat_last_n :]
            ids = torch.tensor(sorted(set(window)), dtype=torch.long, device=logits.device)
            values = logits[row, ids]
            logits[row, ids] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            ids = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude. Shapes: logits [B, V]; the rest [B]."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    remove |= before >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


class Sampler:
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator | None]
    ) -> list[int]:
        """``logits`` [B, vocab] float32, one row per sequence; returns one token id per row."""
        apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.request.params.is_greedy]
        if rows:
            params = [seqs[i].request.params for i in rows]
            device = logits.device
            temperature = torch.tensor([p.temperature for p in params], device=device)
            scaled = logits[rows] / temperature[:, None]
            filtered = filter_logits(
                scaled,
                torch.tensor([p.top_k for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                torch.tensor([p.min_p for p in params], device=device),
            )
            probs = filtered.softmax(dim=-1)
            # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p; one draw per row from its own generator.
            noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=generators[i]) for i in rows])
            tokens[rows] = (probs / noise).argmax(dim=-1)
        return tokens.tolist()
