"""Incremental output text with stop strings.

Each new token re-decodes the output ids (cheap next to a forward pass) so multi-token characters and
tokenizer spacing come out exactly as a full decode would. Text is released only when it can no longer
change: an incomplete UTF-8 character ("\\ufffd") or a possible beginning of a stop string is held back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far, stop string cut once found
        self.released = 0  # characters of text already handed out

    def update(self, output_token_ids: list[int]) -> bool:
        """Decode the output so far; True if a stop string appeared (``text`` is then cut before it)."""
        self.text = self.tokenizer.decode(output_token_ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s, max(0, self.released - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def release(self, finished: bool) -> str:
        """The text delta that is safe to show now (everything left, once finished)."""
        end = len(self.text)
        if not finished:
            end -= self.hold_back
            while end > self.released and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.released:
            return ""
        delta, self.released = self.text[self.released : end], end
        return delta
