"""The windowed detokenizer gives, at every token, exactly what a full decode of the output so far gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.detokenizer import Detokenizer

TEXTS = [
    "def main(argv):\n    return {'naïve': [1, 2.5]}  # café\n",
    "東京タワーは 333 m です。絵文字も: 🦙🚀👩‍💻 and ÅÄÖ.",
    "Hello , world . Don't stop ; ok ?",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def full(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def sequences(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    rng = random.Random(0)
    special = sorted(tokenizer.all_special_ids)
    out = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    # multi-byte characters split over several byte-level tokens, interleaved with special tokens
    mixed = []
    for ids in out:
        mixed += [*ids, rng.choice(special)]
    out.append(mixed)
    # arbitrary ids: invalid and truncated UTF-8 sequences must decode as a full decode replaces them
    out += [[rng.randrange(len(tokenizer)) for _ in range(300)] for _ in range(5)]
    return out


def test_every_step_equals_a_full_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    for ids in sequences(tokenizer):
        detok = Detokenizer(tokenizer, stop=[])
        for n in range(1, len(ids) + 1):
            assert not detok.update(ids[:n])
            assert detok.text == full(tokenizer, ids[:n]), f"differs after {n} tokens"
        detok.update(ids)  # the final call may repeat the ids (an EOS token is not text)
        assert detok.text == full(tokenizer, ids)


def test_released_deltas_join_to_the_full_text_and_never_show_a_partial_character(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=[])
    deltas = []
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
        deltas.append(detok.release(finished=n == len(ids)))
        assert "\ufffd" not in deltas[-1]
    assert "".join(deltas) == TEXTS[1]


def test_stop_string_split_across_tokens_cuts_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=["café"])
    released = []
    for n in range(1, len(ids) + 1):
        hit = detok.update(ids[:n])
        released.append(detok.release(finished=hit))
        if hit:
            break
    assert hit and detok.text == TEXTS[0][: TEXTS[0].index("café")]
    assert "".join(released) == detok.text
