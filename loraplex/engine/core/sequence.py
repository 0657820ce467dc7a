"""Value types of one request as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from loraplex.engine.core.errors import RequestError

# Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``): dividing logits by them overflows to inf/NaN.
SAMPLING_EPS = 1e-5
# The most alternatives a token's log-probability may come with (OpenAI's and Ollama's top_logprobs cap).
MAX_LOGPROBS = 20


class GuideKind(enum.StrEnum):
    """What a ``Guide`` constrains the output text to."""

    JSON = "json"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON that validates against a schema (``spec``: the schema as JSON text)
    REGEX = "regex"  # the whole text matches a regular expression
    CHOICE = "choice"  # exactly one of some strings (``spec``: a JSON list of them)
    GRAMMAR = "grammar"  # an EBNF grammar (xgrammar's dialect of GBNF), root rule ``root``
    STRUCTURAL_TAG = "structural_tag"  # text with tagged structured parts (``spec``: xgrammar's structural tag JSON)


@dataclass(frozen=True)
class Guide:
    """A constraint on a request's output, enforced token by token (structured output). Plain text, so it
    hashes: compiled grammars are cached by it (``engine/model/grammar.py``)."""

    kind: GuideKind
    spec: str = ""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction; messages say what to change."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 (or below SAMPLING_EPS) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off; divides positive logits of recent tokens, multiplies negative
    repeat_last_n: int = 64  # window of prompt + output tokens the repetition penalty looks at; -1 = all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # any integer (the engine reduces it modulo 2**64); None = a random seed
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # each new token's log-probability and this many top alternatives; None = off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # end-of-sequence and stop_token_ids cannot be drawn before this many new tokens
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True  # leave special tokens' text out of the output text
    guide: Guide | None = None  # structured output: only tokens that keep the text valid can be drawn

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "use 1 or more"),
            (self.temperature >= 0, "temperature", "use 0 (greedy) or a positive number"),
            (0 < self.top_p <= 1, "top_p", "use a value in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "use 0 (off) or a positive integer"),
            (0 <= self.min_p <= 1, "min_p", "use a value in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "use a positive number (1 = off)"),
            (self.repeat_last_n >= -1, "repeat_last_n", "use -1 (all), 0 (off) or a positive window"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "use a value in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "use a value in [-2, 2]"),
            (self.seed is None or isinstance(self.seed, int), "seed", "use an integer or leave it out"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "use non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"use 0 to {MAX_LOGPROBS}"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias", "use biases in [-100, 100]"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "use 0 or more"),
        ]
        for ok, name, hint in checks:
            if not ok:
                raise RequestError(f"{name} = {getattr(self, name)!r} is invalid; {hint}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class TokenLogprob:
    """A new token's log-probability and its row's most likely tokens, from the log-softmax of the model's raw
    logits (before penalties, temperature and filters, as vLLM's default raw logprobs)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first; ``params.logprobs`` of them


@dataclass
class Request:
    """What a caller submits: an endpoint, prompt tokens and sampling parameters.

    An ``embed`` request generates nothing: its prompt is prefilled like any other (chunked, within the token
    budget, batched with other requests' steps) and it finishes with its hidden states pooled into one vector.
    """

    request_id: str
    endpoint: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    embed: bool = False
    # ``params.guide`` compiled for the engine's tokenizer; the server compiles it off the event loop before it
    # submits (a grammar that does not compile is its 400), the engine compiles it when nobody has.
    grammar: object | None = None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # the caller went away or asked to cancel
    ERROR = "error"  # the engine failed while running it


@dataclass
class Sequence:
    """A request being served: its tokens, how many of them the KV cache holds, and its adapter slot."""

    request: Request
    lora_name: str | None = None  # the adapter of the request's endpoint; None = base
    lora_slot: int = 0  # where that adapter is resident while the sequence runs; 0 = base
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    output_text: str = ""  # detokenized output, stop strings cut
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prefill_done_time: float | None = None
    cache_salt: bytes = b""  # names the adapter (and its version) in prefix-cache keys; b"" = the base
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks so far
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied when the sequence was first admitted

    @property
    def seq_id(self) -> str:
        return self.request.request_id

    @property
    def endpoint(self) -> str:
        return self.request.endpoint

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
