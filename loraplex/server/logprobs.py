"""Token log-probabilities in each API's shape, from the engine's ``TokenLogprob``s.

The values are the log-softmax of the model's raw logits (before penalties, temperature and filters), as
vLLM returns by default. A token's text is its own decode, special tokens included, and its bytes that text's
UTF-8, as vLLM gives them: a token that holds part of a multi-byte character shows as U+FFFD.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from loraplex.engine.core.sequence import TokenLogprob

FLOOR = -9999.0  # OpenAI's stand-in for a log-probability of -inf, which JSON cannot carry


def _texts(tokenizer: PreTrainedTokenizerBase, logprob: TokenLogprob) -> list[str]:
    """The drawn token's text, then its alternatives', in one batched decode."""
    ids = [[logprob.token_id], *([token] for token, _ in logprob.top)]
    return tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _entry(text: str, value: float) -> dict[str, Any]:
    return {"token": text, "logprob": max(value, FLOOR), "bytes": list(text.encode())}


def token_entries(tokenizer: PreTrainedTokenizerBase, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI chat's ``logprobs.content`` and Ollama's ``logprobs``, which share a shape: per token,
    ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``."""
    entries = []
    for logprob in logprobs:
        text, *alternatives = _texts(tokenizer, logprob)
        top = [_entry(t, value) for t, (_, value) in zip(alternatives, logprob.top, strict=True)]
        entries.append(_entry(text, logprob.logprob) | {"top_logprobs": top})
    return entries


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, logprobs: list[TokenLogprob], offset: int
) -> dict[str, list[Any]]:
    """Legacy completions' parallel lists. Each ``top_logprobs`` dict maps text to log-probability and holds
    the drawn token too (so up to ``logprobs`` + 1 entries, as OpenAI documents); ``text_offset`` counts
    characters from ``offset``, where this part of the text starts."""
    shaped: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for logprob in logprobs:
        text, *alternatives = _texts(tokenizer, logprob)
        top = {t: max(value, FLOOR) for t, (_, value) in zip(alternatives, logprob.top, strict=True)}
        shaped["tokens"].append(text)
        shaped["token_logprobs"].append(max(logprob.logprob, FLOOR))
        shaped["top_logprobs"].append(top | {text: max(logprob.logprob, FLOOR)})
        shaped["text_offset"].append(offset)
        offset += len(text)
    return shaped
