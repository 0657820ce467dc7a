"""Tool calls: tools into the prompt, calls back out of the model's text, and a grammar that forces a call.

A chat template that knows tools (it mentions ``tools``, as Llama 3.1's and Qwen's do) renders them itself, and
the conversation's calls and results go to it in transformers' shape. Any other template (the default model's
ignores ``tools``) gets them in the system message, in the Hermes format many fine-tunes were trained on:

    # Tools
    ...
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    </tools>
    ... answer with <tool_call>{"name": <name>, "arguments": <object>}</tool_call> ...

with earlier calls written back into assistant turns the same way and each tool result sent as a user turn
``<tool_response>...</tool_response>``. The model's answer is parsed by the format the config names
(``model.tool_parser``): ``hermes`` (``<tool_call>`` tags) or ``llama3_json`` (Llama 3.1/3.2's bare
``{"name": ..., "parameters": ...}``, optionally after ``<|python_tag|>``, several joined by ``;``).

``tool_choice`` ``required`` or a named function constrains the answer with a grammar (a structural tag: the
format's opening text, JSON that validates against one of the allowed tools' parameters, its closing text),
so the answer is always a valid call; ``auto`` leaves the model free and parses what it wrote; ``none`` sends
no tools at all.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from transformers import PreTrainedTokenizerBase

from loraplex.engine.core.sequence import Guide, GuideKind
from loraplex.server.errors import APIError

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class Tools:
    """A request's tools (OpenAI's shape, which Ollama uses too), what it lets the model do with them
    (``choice``: auto, required, or the one function it must call), and the model's call format."""

    tools: list[dict[str, Any]]
    choice: str  # "auto" | "required" | "function"
    function: str | None = None  # the named function of choice "function"
    parser: str = "hermes"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def guide(self) -> Guide | None:
        """The grammar of ``required`` and a named function: exactly one call of an allowed tool."""
        if self.choice == "auto":
            return None
        allowed = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.function]
        key = "arguments" if self.parser == "hermes" else "parameters"
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    key: t["function"].get("parameters") or {"type": "object"},
                },
                "required": ["name", key],
                "additionalProperties": False,
            }
            for t in allowed
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parser == "llama3_json":
            return Guide(GuideKind.JSON_SCHEMA, json.dumps(schema))
        content = {"type": "json_schema", "json_schema": schema}
        tag = {"type": "tag", "begin": f"{_OPEN}\n", "content": content, "end": f"\n{_CLOSE}"}
        return Guide(GuideKind.STRUCTURAL_TAG, json.dumps({"type": "structural_tag", "format": tag}))

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(the text outside the calls, the calls); an answer with no call of a known tool is all content."""
        content, calls = _parse_hermes(text) if self.parser == "hermes" else _parse_llama(text)
        if not calls or any(call.name not in self.names for call in calls):
            return text, []
        return content, calls

    def start(self, text: str) -> int | None:
        """Where a call may begin in streamed ``text``: the first marker, or a tail that could grow into one,
        so that text is held back until the call is complete. None: all of ``text`` is content."""
        if self.parser == "llama3_json":
            stripped = text.lstrip()
            if not stripped:
                return None if not text else 0
            return 0 if stripped[0] == "{" or stripped.startswith("<|python_tag|>") else None
        found = text.find(_OPEN)
        if found >= 0:
            return found
        for size in range(min(len(_OPEN) - 1, len(text)), 0, -1):
            if _OPEN.startswith(text[-size:]):
                return len(text) - size
        return None


def constraint(tools: Tools | None, guide: Guide | None, field: str) -> tuple[Guide | None, str]:
    """The request's one constraint and the field it came from: a forced call's grammar, or the structured-output
    ``guide`` of ``field``; both at once is a 400."""
    forced = tools.guide() if tools is not None else None
    if forced is None:
        return guide, field
    if guide is not None:
        message = f"tool_choice {tools.choice!r} and {field} each constrain the answer; send only one of them"
        raise APIError(400, message, param=field)
    return forced, "tools"


class CallStream:
    """One streamed answer with its calls held back: content goes out as it comes, up to where a call may
    begin; the calls (and any text after them) come out whole when the answer ends."""

    def __init__(self, tools: Tools) -> None:
        self.tools, self.text, self.sent = tools, "", 0

    def feed(self, delta: str) -> str:
        """The part of the text so far that is surely content and not yet sent."""
        self.text += delta
        start = self.tools.start(self.text)
        upto = max(self.sent, len(self.text) if start is None else start)
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """The content not yet sent, and the calls."""
        rest = self.text[self.sent :]
        content, calls = self.tools.parse(rest)
        return (content, calls) if calls else (rest, [])


def openai_calls(calls: list[Call]) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls``: arguments as JSON text; streamed deltas add their ``index``."""
    return [
        {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for i, c in enumerate(calls)
    ]


def ollama_calls(calls: list[Call]) -> list[dict[str, Any]]:
    """Ollama's ``tool_calls``: arguments as an object."""
    return [{"function": {"index": i, "name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _parse_hermes(text: str) -> tuple[str, list[Call]]:
    """Every ``<tool_call>`` ... ``</tool_call>`` (the last may be cut off by the token limit) and the text
    around them; a tag whose inside is not a call stays in the text."""
    content, calls, at = [], [], 0
    for match in _HERMES.finditer(text):
        call = _call(match.group(1), "arguments")
        if call is not None:
            content.append(text[at : match.start()])
            calls.append(call)
            at = match.end()
    return "".join([*content, text[at:]]).strip(), calls


def _parse_llama(text: str) -> tuple[str, list[Call]]:
    """Llama 3.1/3.2: the whole answer is one call, or several joined by ``;``; anything else is text."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return text, []
        call = _call(json.dumps(obj), "parameters")
        if call is None:
            return text, []
        calls.append(call)
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return "", calls


def _call(text: str, key: str) -> Call | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return Call(obj["name"], arguments) if isinstance(arguments, dict) else None


# ---- requests -----------------------------------------------------------------------------------------------


def read(raw_tools: list[Any] | None, raw_choice: Any, parser: str) -> Tools | None:
    """The request's tools and choice, checked; None when the model is not to see tools (none sent, or
    ``tool_choice: "none"``). Each mistake is a 400 naming the field."""
    if raw_choice is not None and not raw_tools and raw_choice != "none":
        raise APIError(400, "tool_choice needs tools; send tools or leave tool_choice out", param="tool_choice")
    if not raw_tools or raw_choice == "none":
        return None
    tools = [_tool(i, t) for i, t in enumerate(raw_tools)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise APIError(400, "tools has two functions of the same name; name each once", param="tools")
    if raw_choice in (None, "auto", "required"):
        return Tools(tools, raw_choice or "auto", parser=parser)
    function = raw_choice.get("function") if isinstance(raw_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(raw_choice, dict) or raw_choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(
            400,
            'tool_choice is invalid; use "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in names:
        raise APIError(
            400, f"tool_choice names {name!r}, which is not in tools ({', '.join(names)})", param="tool_choice"
        )
    return Tools(tools, "function", name, parser)


def _tool(index: int, raw: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if (
        not isinstance(raw, dict)
        or raw.get("type", "function") != "function"
        or not isinstance(raw.get("function"), dict)
    ):
        raise APIError(
            400, f'{where} is invalid; send {{"type": "function", "function": {{"name": ...}}}}', param=where
        )
    function = raw["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise APIError(
            400, f"{where}.function.name = {name!r} is invalid; use 1-64 letters, digits, _ . or -", param=where
        )
    parameters = function.get("parameters")
    if parameters is not None:
        try:
            if not isinstance(parameters, dict):
                raise jsonschema.SchemaError("it is not an object")
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except jsonschema.SchemaError as e:
            raise APIError(
                400,
                f"{where}.function.parameters is not a JSON schema: {e.message}",
                param=f"{where}.function.parameters",
            ) from e
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def template_calls(raw: list[dict[str, Any]], where: str, json_text: bool) -> list[dict[str, Any]]:
    """An earlier assistant turn's calls in transformers' shape, arguments as an object (OpenAI sends them as
    JSON text, Ollama as an object)."""
    calls = []
    for i, call in enumerate(raw):
        function = call.get("function")
        arguments = function.get("arguments", {}) if isinstance(function, dict) else None
        if json_text and isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                arguments = None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and isinstance(arguments, dict)):
            form = "JSON text of an object" if json_text else "an object"
            raise APIError(
                400, f"{where}[{i}] is invalid; send function.name and function.arguments ({form})", param=where
            )
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def ollama_turn(index: int, message: Any) -> dict[str, Any]:
    """An Ollama chat message as the chat template expects it (an ``OllamaMessage``)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = template_calls(message.tool_calls, f"messages[{index}].tool_calls", json_text=False)
    if message.role == "tool" and message.tool_name:
        turn["name"] = message.tool_name
    return turn


# ---- prompts ------------------------------------------------------------------------------------------------


def template_knows_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template)
    return bool(text) and "tools" in text


def conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Tools | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages to render, and the tools to give the chat template (None when the template cannot
    render them, or there are none): calls and results in transformers' shape for a template that knows tools,
    else as Hermes text, with the tools in the system message when the model may call them."""
    native = template_knows_tools(tokenizer)
    if native:
        return messages, tools.tools if tools else None
    out = [_as_text(m) for m in messages]
    if tools is not None:
        prompt = _system_prompt(tools.tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _as_text(message: dict[str, Any]) -> dict[str, str]:
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    calls = message.get("tool_calls") or []
    if not calls:
        return {"role": message["role"], "content": message.get("content") or ""}
    written = [
        f"{_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}\n{_CLOSE}"
        for c in calls
    ]
    content = "\n".join(filter(None, [message.get("content") or "", *written]))
    return {"role": "assistant", "content": content}


def _system_prompt(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
