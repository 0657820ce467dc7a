"""Reading an Ollama Modelfile into its instructions, with Ollama's quoting (one place for ``/api/create``,
``loraplex serve --modelfile`` and ``loraplex migrate``), and into a ``ModelSpec``: what a model adds to the base,
from a Modelfile or from ``/api/create``'s fields, checked line by line and written back for ``/api/show``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from loraplex.engine.core.errors import RequestError
from loraplex.server.prompts import parse_go_template

INSTRUCTIONS = ("FROM", "ADAPTER", "SYSTEM", "PARAMETER", "TEMPLATE", "MESSAGE", "LICENSE", "REQUIRES")
ROLES = ("system", "user", "assistant")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("a non-empty string")
    return value


# The PARAMETERs loraplex applies, each with its type: the sampling options of Ollama's api.md.
PARAMETERS: dict[str, Callable[[Any], Any]] = {
    "temperature": _number,
    "top_p": _number,
    "top_k": _integer,
    "min_p": _number,
    "repeat_penalty": _number,
    "repeat_last_n": _integer,
    "presence_penalty": _number,
    "frequency_penalty": _number,
    "seed": _integer,
    "stop": _text,  # repeatable: the values form a list
    "num_predict": _integer,
    "num_ctx": _integer,
}
# Ollama's other options: accepted, as in a request's options, and reported as not applied.
IGNORED_PARAMETERS = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "embedding_only",
        "num_thread",
        "num_keep",
        "tfs_z",
        "typical_p",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "penalize_newline",
    }
)


class ModelfileError(ValueError):
    """A Modelfile line or a create field that cannot be taken; ``where`` names it (the 400's ``param``)."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


@dataclass
class ModelSpec:
    """What one model adds to the base: a Modelfile's instructions, typed and checked."""

    base: str | None = None  # FROM: the base, or a model this one inherits from
    adapter: str | None = None  # ADAPTER, as written
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # option -> value; "stop" -> list of strings
    messages: list[dict[str, str]] = field(default_factory=list)  # leading conversation, oldest first
    license: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what was accepted but is not applied

    def inherit(self, parent: ModelSpec) -> ModelSpec:
        """This spec on top of the model it comes FROM, as Ollama layers them: its own settings win, parameters
        key by key."""
        return ModelSpec(
            base=self.base,
            adapter=self.adapter,
            system=self.system if self.system is not None else parent.system,
            template=self.template if self.template is not None else parent.template,
            parameters=parent.parameters | self.parameters,
            messages=self.messages or list(parent.messages),
            license=self.license or list(parent.license),
            warnings=list(self.warnings),
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "warnings"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def instructions(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, INSTRUCTION in upper case, argument unquoted) per instruction; comments and blank lines
    skipped. A ``\"\"\"...\"\"\"`` argument may span lines."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        argument = argument.strip()
        if argument.count('"""') == 1:  # a multi-line string: read to its end
            while i < len(lines) and '"""' not in lines[i]:
                argument += "\n" + lines[i]
                i += 1
            if i < len(lines):
                argument += "\n" + lines[i]
                i += 1
        yield number, instruction.upper(), unquote(argument)


def unquote(value: str) -> str:
    for quote in ('"""', '"'):
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote) : -len(quote)]
    return value


def parse_modelfile(text: str) -> ModelSpec:
    """A Modelfile as a ModelSpec; the first line that cannot be taken is a ModelfileError naming it."""
    spec = ModelSpec()
    for number, keyword, argument in instructions(text):
        where = f"modelfile line {number}"
        if keyword not in INSTRUCTIONS:
            raise ModelfileError(
                f"{where}: {keyword} is not a Modelfile instruction; use {', '.join(INSTRUCTIONS)}", "modelfile"
            )
        if not argument and keyword not in ("SYSTEM", "TEMPLATE"):
            raise ModelfileError(f"{where}: {keyword} needs an argument", "modelfile")
        if keyword == "FROM":
            spec.base = argument
        elif keyword == "ADAPTER":
            if spec.adapter is not None:
                raise ModelfileError(f"{where}: a second ADAPTER; loraplex serves one adapter per model", "modelfile")
            spec.adapter = argument
        elif keyword == "SYSTEM":
            spec.system = argument
        elif keyword == "TEMPLATE":
            spec.template = check_template(argument, f"{where}: TEMPLATE", "modelfile")
        elif keyword == "PARAMETER":
            name, _, value = argument.partition(" ")
            _set_parameter(spec, name, _parameter_text(value.strip()), f"{where}: PARAMETER {name}", "modelfile")
        elif keyword == "MESSAGE":
            role, _, content = argument.partition(" ")
            spec.messages.append(_message(role, unquote(content.strip()), f"{where}: MESSAGE", "modelfile"))
        elif keyword == "LICENSE":
            spec.license.append(argument)
    return spec


def spec_from_fields(
    base: str | None,
    adapters: dict[str, str] | None,
    system: str | None,
    template: str | None,
    parameters: dict[str, Any] | None,
    messages: list[Any] | None,
    license: str | list[str] | None,
) -> ModelSpec:
    """The newer /api/create fields (what the ``ollama`` client sends) as a ModelSpec; errors name the field."""
    paths = list((adapters or {}).values())
    if len(paths) > 1:
        raise ModelfileError(f"{len(paths)} adapters given; loraplex serves one adapter per model", "adapters")
    spec = ModelSpec(base=base, adapter=paths[0] if paths else None, system=system)
    if template is not None:
        spec.template = check_template(template, "template", "template")
    for name, value in (parameters or {}).items():
        values = value if name == "stop" and isinstance(value, list) else [value]
        for one in values:
            _set_parameter(spec, name, one, f"parameters.{name}", f"parameters.{name}")
    for i, message in enumerate(messages or []):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("content", ""), str):
            raise ModelfileError(f"{where}: send an object with role and content (a string)", where)
        spec.messages.append(_message(str(message.get("role", "")), message.get("content", ""), where, where))
    spec.license = [license] if isinstance(license, str) else list(license or [])
    return spec


def check_template(template: str, where: str, param: str) -> str:
    """The template, if loraplex renders every construct in it (prompts.py's subset, Response and after)."""
    try:
        parse_go_template(template, whole=True)
    except RequestError as e:
        raise ModelfileError(
            f"{where}: {e}; or leave the template out to use the model's own chat template", param
        ) from e
    return template


def _parameter_text(value: str) -> Any:
    """A PARAMETER value as written: a JSON string literal (escapes decoded), a number, or bare text."""
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return unquote(value)
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _set_parameter(spec: ModelSpec, name: str, value: Any, where: str, param: str) -> None:
    if name in IGNORED_PARAMETERS:
        spec.warnings.append(f"{where} is not applied by loraplex (as in a request's options); it is ignored")
        return
    convert = PARAMETERS.get(name)
    if convert is None:
        known = ", ".join(PARAMETERS)
        raise ModelfileError(f"{where}: unknown parameter {name!r}; loraplex applies {known}", param)
    try:
        typed = convert(value)
    except TypeError as e:
        raise ModelfileError(f"{where}: {value!r} is not {e}; {name} takes {e}", param) from None
    if name == "stop":
        spec.parameters.setdefault("stop", []).append(typed)
    else:
        spec.parameters[name] = typed


def _message(role: str, content: str, where: str, param: str) -> dict[str, str]:
    if role not in ROLES:
        raise ModelfileError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}", param)
    return {"role": role, "content": content}


def _block(keyword: str, text: str) -> str:
    return f'{keyword} """{text}"""\n'


def write_modelfile(spec: ModelSpec, name: str, base: str, adapter: str | None) -> str:
    """The Modelfile of a model as Ollama's ``show`` writes it: resolved FROM and ADAPTER, then the rest."""
    lines = [
        '# Modelfile generated by "loraplex show"\n',
        "# To build a new Modelfile based on this, replace FROM with:\n",
        f"# FROM {name}:latest\n\n",
        f"FROM {base}\n",
    ]
    lines += [f"ADAPTER {adapter}\n"] if adapter else []
    lines += [_block("TEMPLATE", spec.template)] if spec.template is not None else []
    lines += [_block("SYSTEM", spec.system)] if spec.system is not None else []
    lines += [f"PARAMETER {k} {json.dumps(v)}\n" for k, v in parameter_items(spec.parameters)]
    lines += [f"MESSAGE {m['role']} {_block('', m['content']).strip()}\n" for m in spec.messages]
    lines += [_block("LICENSE", text) for text in spec.license]
    return "".join(lines)


def parameter_items(parameters: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) per PARAMETER line: one per stop string."""
    return [(k, one) for k, v in parameters.items() for one in (v if isinstance(v, list) else [v])]


def parameters_text(parameters: dict[str, Any]) -> str:
    """``/api/show``'s ``parameters``: one line per value, the name padded to 30, as Ollama writes them."""
    return "\n".join(f"{k:<30} {json.dumps(v)}" for k, v in parameter_items(parameters))
