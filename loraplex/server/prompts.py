"""Turning Ollama and OpenAI request text into the prompt string the model sees.

Chat templates come from the tokenizer. Ollama's ``template`` field is a Go template; the subset that
single-turn templates use (``.System``, ``.Prompt``, ``.Response``, ``if .System`` and the ``{{-``/``-}}``
whitespace trims) is rendered here, and anything beyond it is refused rather than rendered wrongly. The template
is parsed and checked on its own first; the request's text is then inserted as data, never scanned for actions,
so a prompt about ``{{ x }}`` reaches the model as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from loraplex.engine.core.errors import RequestError


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    """The model's own chat template with the assistant turn opened (and ``tools``, for a template that
    renders them)."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise RequestError(f"the messages do not fit the model's chat template: {e}") from e


# One Go template action; a trim marker is a dash with white space on its inner side ("{{-3}}" is a number).
_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.DOTALL)
_SUPPORTED = re.compile(r"\.(?P<field>System|Prompt|Response)|if\s+\.(?P<cond>System)|(?P<end>end)")
_GO_WHITESPACE = " \t\r\n"
_UNSUPPORTED = (
    "use only {{ .System }}, {{ .Prompt }}, {{ .Response }} and {{ if .System }}...{{ end }}, "
    "or send raw=true with a formatted prompt"
)


@dataclass(frozen=True)
class Action:
    """A supported ``{{ ... }}``: insert ``field``, open ``if`` on ``field``, or ``end`` the innermost ``if``."""

    kind: Literal["field", "if", "end"]
    field: str = ""


def parse_go_template(template: str, whole: bool = False) -> list[str | Action]:
    """The template as literal text and actions up to ``.Response`` (where the model continues), or with ``whole``
    all of it (a finished turn of a conversation, answer included).

    Refuses what loraplex does not render before any user text exists, so a request's text can never be taken for
    template source.
    """
    parts: list[str | Action] = []
    trim_next, rest = False, 0
    for match in _ACTION.finditer(template):
        text = template[rest : match.start()]
        parts.append(_literal(text, trim_left=trim_next, trim_right=bool(match[1])))
        action, trim_next, rest = _action(match[2].strip()), bool(match[3]), match.end()
        if action.field == "Response" and not whole:
            _check_nesting(parts, at_response=True)
            return parts
        parts.append(action)
    parts.append(_literal(template[rest:], trim_left=trim_next, trim_right=False))
    _check_nesting(parts, at_response=False)
    return parts


def _literal(text: str, trim_left: bool, trim_right: bool) -> str:
    """Template text between actions, with Go's white-space trims applied."""
    if "{{" in text:
        raise RequestError(f"template has an unclosed action at {text[text.index('{{') :][:20]!r}; {_UNSUPPORTED}")
    text = text.lstrip(_GO_WHITESPACE) if trim_left else text
    return text.rstrip(_GO_WHITESPACE) if trim_right else text


def _action(body: str) -> Action:
    match = _SUPPORTED.fullmatch(body)
    if match is None:
        raise RequestError(f"template action {{{{ {body} }}}} is not supported by loraplex; {_UNSUPPORTED}")
    if match["end"]:
        return Action("end")
    return Action("if", match["cond"]) if match["cond"] else Action("field", match["field"])


def _check_nesting(parts: list[str | Action], at_response: bool) -> None:
    """Every ``end`` closes an ``if``; an ``if`` still open at ``.Response`` ends there."""
    depth = 0
    for part in parts:
        if isinstance(part, Action) and part.kind != "field":
            depth += 1 if part.kind == "if" else -1
            if depth < 0:
                raise RequestError("template has {{ end }} without {{ if .System }}; remove it or add the if")
    if depth > 0 and not at_response:
        raise RequestError("template has {{ if .System }} without {{ end }}; close it with {{ end }}")


def render_go_template(template: str, system: str, prompt: str, response: str | None = None) -> str:
    """Ollama's single-turn template subset, with ``system`` and ``prompt`` inserted verbatim; with a ``response``
    the whole template, a finished turn."""
    values = {"System": system, "Prompt": prompt, "Response": response or ""}
    shown, out = [True], []
    for part in parse_go_template(template, whole=response is not None):
        if isinstance(part, str):
            out.append(part if shown[-1] else "")
        elif part.kind == "if":
            shown.append(shown[-1] and bool(values[part.field]))
        elif part.kind == "end":
            shown.pop()
        else:
            out.append(values[part.field] if shown[-1] else "")
    return "".join(out)
