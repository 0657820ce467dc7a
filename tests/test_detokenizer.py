"""The windowed detokenizer gives, at every token, exactly what a full decode of the output so far gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.engine.core.detokenizer import Detokenizer

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


# one-, two-, three- and four-byte characters: byte-level BPE splits the longer ones across tokens
ALPHABET = "ab \n.é東京🎉🦙"


def byte_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text``, as byte-level BPE spells each byte."""
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    return tokenizer.convert_tokens_to_ids([char for piece, _ in pieces for char in piece])


@st.composite
def token_streams(draw: st.DrawFn, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` cut at random bytes; a chunk that is whole characters is BPE-encoded, any other goes byte by byte."""
    data, byte_ids = text.encode(), byte_token_ids(tokenizer, text)
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=len(data) - 1))) if len(data) > 1 else []
    ids = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        try:
            ids += tokenizer.encode(data[start:end].decode(), add_special_tokens=False)
        except UnicodeDecodeError:
            ids += byte_ids[start:end]
    return ids


def stop_strings(text: str) -> st.SearchStrategy[str]:
    """Stop strings that occur in ``text`` and others that may not."""
    starts = st.integers(0, len(text) - 1)
    inside = starts.flatmap(lambda i: st.integers(i + 1, len(text)).map(lambda j: text[i:j]))
    return st.one_of(inside, st.text(ALPHABET, min_size=1, max_size=4))


def stream(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: list[str]) -> tuple[list[str], list[str]]:
    """The deltas released token by token, as the engine does, and the text held back after each."""
    detok = Detokenizer(tokenizer, stop)
    deltas, held = [], []
    for n in range(1, len(ids) + 1):
        hit = detok.update(ids[:n])
        deltas.append(detok.release(finished=hit or n == len(ids)))
        held.append(detok.text[len("".join(deltas)) :])
        if hit:
            break
    return deltas, held


def answer_without_streaming(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: list[str]) -> str:
    """A full decode at the first token where a stop string appears, cut before it."""
    for n in range(1, len(ids) + 1):
        text = full(tokenizer, ids[:n])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)]
    return full(tokenizer, ids)


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, min_size=1, max_size=24), data=st.data())
def test_streamed_text_never_shows_the_start_of_a_stop_string_and_equals_the_answer(
    tokenizer: PreTrainedTokenizerBase, text: str, data: st.DataObject
) -> None:
    stop = data.draw(st.lists(stop_strings(text), min_size=1, max_size=3), label="stop")
    ids = data.draw(token_streams(tokenizer, text), label="ids")
    assert full(tokenizer, ids) == text
    answer = answer_without_streaming(tokenizer, ids, stop)
    deltas, held = stream(tokenizer, ids, stop)
    for n in range(len(deltas)):
        streamed = "".join(deltas[: n + 1])
        assert answer.startswith(streamed), f"after {n + 1} tokens {streamed!r} went past the answer {answer!r}"
        complete = held[n].rstrip("\ufffd")  # an incomplete character is held back until it completes
        assert not complete or any(s.startswith(complete) for s in stop), f"held back {complete!r} needlessly"
    assert "".join(deltas) == answer


@pytest.mark.parametrize("spelling", ["bpe", "bytes"])
def test_stop_string_ending_in_an_emoji_split_across_tokens_is_never_streamed(
    tokenizer: PreTrainedTokenizerBase, spelling: str
) -> None:
    text = "Say hi 🎉 now"
    ids = tokenizer.encode(text, add_special_tokens=False) if spelling == "bpe" else byte_token_ids(tokenizer, text)
    deltas, _ = stream(tokenizer, ids, stop=["hi 🎉"])
    assert "".join(deltas) == "Say "
