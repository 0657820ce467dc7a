"""Structured-output fields of each API -> the engine's ``Guide``: Ollama's ``format``, OpenAI's
``response_format``, and vLLM's ``structured_outputs`` and ``guided_*`` extra fields.

Only the shape is checked here, with a 400 that names the field; whether a schema, regex or grammar compiles
is the engine's question (``LLMEngine.compile_guide``), asked before the request is queued.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from loraplex.engine.core.sequence import Guide, GuideKind
from loraplex.server.errors import APIError


class OpenAIGuided(Protocol):
    """The structured-output fields of both OpenAI request bodies."""

    response_format: dict[str, Any] | None
    structured_outputs: dict[str, Any] | None
    guided_json: Any
    guided_regex: Any
    guided_choice: Any
    guided_grammar: Any


def ollama_format(value: Any) -> Guide | None:
    """``format``: "json" (any JSON object) or a JSON schema object; "" or null is plain text."""
    if value in (None, ""):
        return None
    if value == "json":
        return Guide(GuideKind.JSON)
    if isinstance(value, dict):
        return Guide(GuideKind.JSON_SCHEMA, json.dumps(value))
    raise APIError(400, f'format = {value!r} is invalid; use "json" or a JSON schema object', param="format")


def openai_guide(body: OpenAIGuided) -> tuple[Guide | None, str]:
    """The guide, and the field it came from: at most one of ``response_format`` (other than text),
    ``structured_outputs`` ({"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...})
    and ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (vLLM's older names)."""
    response_format, outputs = body.response_format, body.structured_outputs
    found: list[tuple[str, Guide]] = []
    if response_format is not None:
        guide = _response_format(response_format)
        if guide is not None:
            found.append(("response_format", guide))
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
        found += [(f"structured_outputs.{k}", _vllm(f"structured_outputs.{k}", k, v)) for k, v in outputs.items()]
    for key in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{key}")
        if value is not None:
            found.append((f"guided_{key}", _vllm(f"guided_{key}", key, value)))
    found = [(name, guide) for name, guide in found if guide is not None]
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"{names} each constrain the output; send only one of them", param=found[1][0])
    return (found[0][1], found[0][0]) if found else (None, "")


def _response_format(value: dict[str, Any]) -> Guide | None:
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Guide(GuideKind.JSON)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(
                400,
                'response_format.json_schema is missing; send {"type": "json_schema", "json_schema": {"name": ..., '
                '"schema": {...}}}',
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            field = "response_format.json_schema.schema"
            raise APIError(400, f"{field} must be a JSON schema object", param=field)
        return Guide(GuideKind.JSON_SCHEMA, json.dumps(schema)) if schema else Guide(GuideKind.JSON)
    raise APIError(
        400,
        f'response_format.type = {kind!r} is invalid; use "text", "json_object" or "json_schema"',
        param="response_format.type",
    )


def _vllm(field: str, key: str, value: Any) -> Guide | None:
    """One of vLLM's structured-output fields."""
    if key == "json_object":
        return Guide(GuideKind.JSON) if value else None
    if key == "json":
        if isinstance(value, str):  # vLLM takes the schema as JSON text too
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise APIError(400, f"{field} is not valid JSON ({e}); send a JSON schema", param=field) from e
        if not isinstance(value, dict):
            raise APIError(400, f"{field} must be a JSON schema object", param=field)
        return Guide(GuideKind.JSON_SCHEMA, json.dumps(value))
    if key == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise APIError(400, f"{field} must be a list of non-empty strings", param=field)
        return Guide(GuideKind.CHOICE, json.dumps(value))
    if key in ("regex", "grammar"):
        if not (isinstance(value, str) and value):
            raise APIError(400, f"{field} must be a non-empty string", param=field)
        return Guide(GuideKind.REGEX if key == "regex" else GuideKind.GRAMMAR, value)
    if key == "structural_tag":
        return Guide(GuideKind.STRUCTURAL_TAG, value if isinstance(value, str) else json.dumps(value))
    raise APIError(
        400,
        f"{field} is not a structured-output field; use json, regex, choice, grammar, json_object or structural_tag",
        param=field,
    )
