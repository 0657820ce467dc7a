"""Ollama request fields -> engine sampling parameters, with Ollama's defaults, and the features refused."""

from __future__ import annotations

from loraplex.engine.core.sequence import Guide, SamplingParams
from loraplex.server.errors import unsupported
from loraplex.server.generation import max_new_tokens
from loraplex.server.schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions

# Ollama's defaults (api.md / llama.cpp runner): sampling is on unless temperature is set to 0.
DEFAULTS = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def sampling_params(
    options: OllamaOptions | None,
    num_prompt_tokens: int,
    context: int,
    logprobs: int | None = None,
    guide: Guide | None = None,
) -> SamplingParams:
    """num_predict absent or negative (-1 infinite, -2 fill context) means up to the context limit."""
    opts = options or OllamaOptions()

    def get(name: str) -> float:
        value = getattr(opts, name)
        return DEFAULTS[name] if value is None else value

    stop = [opts.stop] if isinstance(opts.stop, str) else list(opts.stop or [])
    return SamplingParams(
        max_tokens=max_new_tokens(opts.num_predict, num_prompt_tokens, context),
        temperature=get("temperature"),
        top_p=get("top_p"),
        top_k=int(get("top_k")),
        min_p=get("min_p"),
        repetition_penalty=get("repeat_penalty"),
        repeat_last_n=int(get("repeat_last_n")),
        presence_penalty=get("presence_penalty"),
        frequency_penalty=get("frequency_penalty"),
        seed=None if opts.seed == -1 else opts.seed,  # -1 (Ollama's default): a random seed, as in Ollama
        stop=stop,
        logprobs=logprobs,
        guide=guide,
    )


def refuse_unsupported(body: OllamaGenerateRequest | OllamaChatRequest) -> None:
    """Features that would change the answer and cannot be honoured yet: a clear 400, never silence."""
    if body.think:
        raise unsupported("thinking (think)", "think")
    if isinstance(body, OllamaGenerateRequest):
        if body.suffix:
            raise unsupported("fill-in-the-middle (suffix)", "suffix")
        if body.images:
            raise unsupported("images", "images")
        return
    for i, message in enumerate(body.messages):
        if message.images:
            raise unsupported("images", f"messages[{i}].images")
