"""Turning Ollama and OpenAI request text into the prompt string the model sees.

Chat templates come from the tokenizer. Ollama's ``template`` field is a Go template; the subset that
single-turn templates use (``.System``, ``.Prompt``, ``.Response`` and ``if .System``) is rendered here, and
anything beyond it is refused rather than rendered wrongly.
"""

from __future__ import annotations

import re

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from engine.errors import RequestError

_IF_SYSTEM = re.compile(r"\{\{-?\s*if\s+\.System\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}", re.DOTALL)
_RESPONSE = re.compile(r"\{\{-?\s*\.Response\s*-?\}\}")
_FIELD = re.compile(r"\{\{-?\s*\.(System|Prompt)\s*-?\}\}")


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The model's own chat template with the assistant turn opened."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise RequestError(f"the messages do not fit the model's chat template: {e}") from e


def render_go_template(template: str, system: str, prompt: str) -> str:
    """Ollama's single-turn template subset; the text after ``.Response`` is where the model continues."""
    template = _RESPONSE.split(template, maxsplit=1)[0]
    text = _IF_SYSTEM.sub(lambda m: m.group(1) if system else "", template)
    text = _FIELD.sub(lambda m: system if m.group(1) == "System" else prompt, text)
    if "{{" in text:
        raise RequestError(
            "template uses Go template features loraplex does not render; use only {{ .System }}, {{ .Prompt }}, "
            "{{ .Response }} and {{ if .System }}...{{ end }}, or send raw=true with a formatted prompt"
        )
    return text


def render_generate(
    tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None, template: str | None, raw: bool
) -> str:
    """The prompt of an Ollama /api/generate request: as sent when raw, else through a template."""
    if raw:
        return prompt
    if template:
        return render_go_template(template, system or "", prompt)
    messages = [{"role": "system", "content": system}] if system else []
    return render_chat(tokenizer, [*messages, {"role": "user", "content": prompt}])
