"""Structured output: guides compiled into grammars, one matcher per constrained request, and the token masks
the sampler applies to those requests' rows.

The grammar engine is xgrammar, chosen by measurement against llguidance on the default model's 49,152-token
vocabulary (2-core CPU): compiling a JSON schema 9 ms (0.04 ms when cached), a token mask 7 µs median
against llguidance's 33 µs. Its matchers release the GIL while they fill masks, so the engine fills the masks
of step n+1 on a worker thread while the forward pass of step n+1 runs (``fill_async``); the forward needs
only the tokens of step n, which the matchers have accepted by then.

JSON comes out compact (``{"a": 1, "b": [2, 3]}``, the separators of Python's ``json.dumps``): with any
whitespace allowed, a small model can fill its whole budget with newlines and never close the object.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sequence import Guide, GuideKind

if TYPE_CHECKING:
    import xgrammar as xgr


def _xgr():
    """xgrammar, imported on the first guide: it pulls in triton, which a server that never sees a guide
    should not load."""
    return importlib.import_module("xgrammar")


# xgrammar's errors start with a timestamp and the C++ file and line; the user needs only the reason.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass
class Masks:
    """Token masks of one step's constrained rows: row ``r`` of ``bitmask`` (32 tokens per int32) is row ``r``
    of the logits, for each ``r`` in ``rows``; the other rows of ``bitmask`` are never read."""

    bitmask: torch.Tensor  # [rows of the step's logits, ceil(vocab / 32)] int32
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """In place: -inf on each constrained row's tokens the grammar does not allow next."""
        _xgr().apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), indices=self.rows)


class Grammars:
    """Guides compiled for one tokenizer, cached by guide; matchers; masks for a batch.

    The vocabulary scan (about 0.6 s for the default model) runs on first use, so a server that never sees a
    guide never pays it. ``compile`` is thread-safe: the server calls it off the event loop."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._filler: ThreadPoolExecutor | None = None  # started by the first guided step

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = _xgr().TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = _xgr().GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, guide: Guide) -> xgr.CompiledGrammar:
        """The guide's grammar (cached by xgrammar by its text); a RequestError that says what is wrong with it."""
        try:
            return self._compile(guide)
        except (RuntimeError, ValueError, TypeError) as e:
            reason = _CPP_PREFIX.sub("", str(e).strip()).strip()
            raise RequestError(f"the {_NAMES[guide.kind]} cannot be compiled into a grammar: {reason}") from e

    def _compile(self, guide: Guide) -> xgr.CompiledGrammar:
        compiler, kind, spec = self.compiler, guide.kind, guide.spec
        if kind is GuideKind.JSON:  # any JSON object, whatever its keys (strict mode would allow only {})
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind is GuideKind.JSON_SCHEMA:
            return compiler.compile_json_schema(spec, any_whitespace=False)
        if kind is GuideKind.REGEX:
            return compiler.compile_regex(spec)
        if kind is GuideKind.CHOICE:
            return compiler.compile_grammar(choice_grammar(json.loads(spec)))
        if kind is GuideKind.GRAMMAR:
            return compiler.compile_grammar(spec)
        return compiler.compile_structural_tag(spec)

    def matcher(self, grammar: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return _xgr().GrammarMatcher(grammar)

    def fill_async(self, matchers: list[xgr.GrammarMatcher | None]) -> Future[Masks] | None:
        """The masks of the rows whose matcher is not None, filled on the worker thread; None if there are none."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._filler.submit(self._fill, matchers, rows)

    def _fill(self, matchers: list[xgr.GrammarMatcher | None], rows: list[int]) -> Masks:
        bitmask = _xgr().allocate_token_bitmask(len(matchers), self.vocab_size)
        for row in rows:
            matchers[row].fill_next_token_bitmask(bitmask, row)
        return Masks(bitmask, rows)


_NAMES = {
    GuideKind.JSON: "JSON format",
    GuideKind.JSON_SCHEMA: "JSON schema",
    GuideKind.REGEX: "regular expression",
    GuideKind.CHOICE: "choice list",
    GuideKind.GRAMMAR: "grammar",
    GuideKind.STRUCTURAL_TAG: "structural tag",
}


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose texts are exactly ``choices`` (its string literals escape as JSON's do)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
