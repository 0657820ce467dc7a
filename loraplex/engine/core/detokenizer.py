"""Incremental output text with stop strings.

Re-decoding all output ids at every token costs O(n) per token (about 1 ms per sequence at 2,048 tokens in
a one-off timing on the 2-core CPU), taken from the engine loop at every step for every running sequence. Instead,
each token decodes a short window: the ids since the last settled point, plus the ids of the settled step
before it as context (SentencePiece tokenizers drop a word's leading space at the start of a decode; the
context makes that drop the same in both decodes). The new text is the window's decode minus the context's.
A point is settled once its text no longer ends in an incomplete UTF-8 character ("\\ufffd"), so a
multi-byte character split across tokens comes out whole, as a full decode gives it.

Text is the plain concatenation of the tokens' text (``clean_up_tokenization_spaces=False``), as Ollama and
vLLM stream it: a cleanup would rewrite text already sent (" ." into ".") and alters code.

Text is released only when it can no longer change or be cut: an incomplete character at the end is held back,
and so is the longest end of the completed text that begins a stop string. Holding back a fixed number of
characters instead would count an incomplete "\\ufffd" as one and release the start of a stop string that ends
in a multi-byte character ("Say h" of "Say hi 🎉" with the stop string "hi 🎉").
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop  # the text keeps the stop string that ended it
        self.max_stop_prefix = max((len(s) for s in stop), default=1) - 1  # a full stop string is cut, not held
        self.text = ""  # everything decoded so far, stop string cut once found
        self.released = 0  # characters of text already handed out
        self.context_start = 0  # ids[context_start:settled] are decoded again as context for the window
        self.settled = 0  # ids whose text is final
        self.settled_chars = 0  # len(text) that ids[:settled] produce

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def update(self, output_token_ids: list[int]) -> bool:
        """Decode the output so far; True if a stop string appeared (``text`` is then cut before it, or after
        it with ``include_stop``)."""
        ids = output_token_ids  # grows by one per call, or repeats (a final EOS is not text)
        context = self._decode(ids[self.context_start : self.settled])
        window = self._decode(ids[self.context_start :])
        self.text = self.text[: self.settled_chars] + window[len(context) :]
        if len(ids) > self.settled and not self.text.endswith("\ufffd"):
            self.context_start, self.settled, self.settled_chars = self.settled, len(ids), len(self.text)
        hits = [(self.text.find(s, max(0, self.released - len(s))), s) for s in self.stop]
        found = [(i, s) for i, s in hits if i >= 0]
        if found:
            at, stop = min(found)
            self.text = self.text[: at + len(stop) if self.include_stop else at]
            return True
        return False

    def release(self, finished: bool) -> str:
        """The text delta that is safe to show now (everything left, once finished)."""
        end = len(self.text) if finished else self._safe_end()
        if end <= self.released:
            return ""
        delta, self.released = self.text[self.released : end], end
        return delta

    def _safe_end(self) -> int:
        """Where the text that can still become part of a stop string or a character begins."""
        complete = self.text.rstrip("\ufffd")
        return len(complete) - self._stop_prefix_len(complete)

    def _stop_prefix_len(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins some stop string.

        Only the unreleased text is searched: an end reaching into released text would have been held back then.
        """
        for n in range(min(self.max_stop_prefix, len(text) - self.released), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
