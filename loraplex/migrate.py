"""``loraplex migrate``: the models of the old Ollama pods, as they are, turned into one loraplex config.

Input is either Ollama's models folder (``manifests/`` and ``blobs/``, what each pod served) or the Modelfiles
the pods were built from. Every model must sit on one base (the point of loraplex: one copy of the base). A
model with an ``ADAPTER`` becomes an endpoint serving that adapter (a GGUF LoRA file, as Ollama keeps them, or
a PEFT folder); a model without one becomes an endpoint on the base when its Modelfile sets anything, else an
alias of the base endpoint. Replica counts given on the command line become each endpoint's guaranteed slots.

Each endpoint gets a Modelfile, ``<endpoint>.Modelfile`` beside the config (flat, so the config and its
Modelfiles travel as one folder, as a Kubernetes ConfigMap mounts them), that its ``modelfile`` key names: its
``SYSTEM``, ``MESSAGE``, ``PARAMETER``, ``TEMPLATE`` and ``LICENSE`` are the endpoint's defaults. A line the
server would not apply (an option loraplex ignores or does not know, a value out of range, a template construct
outside the subset loraplex renders) is checked here with the server's own reader, kept in the Modelfile as a
comment and listed in the command's warnings, so the config always starts and nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.engine.core.config import EndpointConfig, EngineConfig, LimitsConfig
from loraplex.engine.core.errors import ConfigError
from loraplex.server.modelfile import INSTRUCTIONS, instructions, parse_modelfile, unquote
from loraplex.server.ollama_params import sampling_params
from loraplex.server.schemas import OllamaOptions

# Ollama's media types of a manifest's layers
MEDIA = "application/vnd.ollama.image."
TEXT_LAYERS = {"system": "SYSTEM", "template": "TEMPLATE", "license": "LICENSE"}
SUFFIX = ".Modelfile"
QUOTING = 'its text holds """ where a Modelfile cannot quote it'


@dataclass
class Setting:
    """One line of an old pod's Modelfile beyond FROM and ADAPTER, and where it was read (for the warnings)."""

    keyword: str  # SYSTEM, TEMPLATE, PARAMETER, MESSAGE or LICENSE
    value: str  # the text; for PARAMETER the value as Modelfile text (a number, bare text or a JSON string)
    origin: str  # where the old pod had it: "Modelfile line 4", "the params layer"
    name: str = ""  # PARAMETER: the option; MESSAGE: the role

    @property
    def line(self) -> str:
        if self.keyword == "PARAMETER":
            return f"PARAMETER {self.name} {self.value}"
        return " ".join(filter(None, (self.keyword, self.name))) + f' """{self.value}"""'

    def refusal(self) -> str | None:
        """Why the server would not apply this line as written, or None: its reader refuses the line or warns
        that it ignores it, the value is out of range, or the text does not read back as it was."""
        try:
            spec = parse_modelfile(self.line)
            _check_range(spec.parameters)
        except ValueError as e:
            return QUOTING if '"""' in self.value else str(e).removeprefix("modelfile line 1: ")
        if spec.warnings:
            return spec.warnings[0].removeprefix("modelfile line 1: ")
        read = {
            "SYSTEM": spec.system,
            "TEMPLATE": spec.template,
            "MESSAGE": spec.messages[0]["content"] if spec.messages else None,
            "LICENSE": spec.license[0] if spec.license else None,
        }
        if self.keyword in read and read[self.keyword] != self.value:
            return QUOTING
        return None


@dataclass
class ModelSource:
    """One old pod's model: its base and adapter files and what else its Modelfile set."""

    name: str
    base: str  # a file path, or (from a Modelfile) an Ollama model name
    origin: str  # the Modelfile or manifest it was read from
    adapter: Path | None = None
    settings: list[Setting] = field(default_factory=list)


def read_modelfile(path: Path, name: str) -> ModelSource:
    """A Modelfile's instructions; relative FROM and ADAPTER paths resolve against its folder. An unknown
    instruction is an error naming its line."""
    source = ModelSource(name=name, base="", origin=str(path))
    adapters = []
    for number, instruction, argument in instructions(path.read_text()):
        where = f"{path.name} line {number}"
        if instruction not in INSTRUCTIONS:
            raise ConfigError(f"{name}: {where}: {instruction} is not a Modelfile instruction")
        if not argument and instruction not in ("SYSTEM", "TEMPLATE"):
            raise ConfigError(f"{name}: {where}: {instruction} needs an argument")
        if instruction == "FROM":
            candidate = (path.parent / argument).expanduser()
            source.base = str(candidate.resolve()) if candidate.exists() else argument
        elif instruction == "ADAPTER":
            adapters.append((path.parent / argument).expanduser().resolve())
        elif instruction in ("PARAMETER", "MESSAGE"):
            key, _, value = argument.partition(" ")
            value = value.strip() if instruction == "PARAMETER" else unquote(value.strip())  # as the server reads it
            source.settings.append(Setting(instruction, value, where, key))
        elif instruction in ("SYSTEM", "TEMPLATE", "LICENSE"):
            source.settings.append(Setting(instruction, argument, where))
    if not source.base:
        raise ConfigError(f"{name}: the Modelfile has no FROM line")
    if len(adapters) > 1:
        raise ConfigError(f"{name}: {len(adapters)} ADAPTER lines; loraplex serves one adapter per model")
    source.adapter = adapters[0] if adapters else None
    return source


def read_ollama_models(models_dir: Path) -> list[ModelSource]:
    """Every model in Ollama's models folder: ``manifests/<registry>/<namespace>/<model>/<tag>`` (JSON, one
    layer per part of the model) and ``blobs/sha256-<hex>`` (the parts)."""
    manifests = models_dir / "manifests"
    if not manifests.is_dir():
        raise ConfigError(f"{models_dir} has no manifests/ folder; give Ollama's models folder (~/.ollama/models)")
    sources = []
    for path in sorted(p for p in manifests.rglob("*") if p.is_file()):
        *_, namespace, model, tag = path.relative_to(manifests).parts
        name = model if namespace == "library" else f"{namespace}-{model}"
        name = name if tag == "latest" else f"{name}-{tag}"
        try:
            layers = json.loads(path.read_text())["layers"]
            sources.append(_manifest_source(models_dir, name, path, layers))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not an Ollama manifest ({e})") from e
    if not sources:
        raise ConfigError(f"{manifests} holds no manifests")
    return sources


def _manifest_source(models_dir: Path, name: str, path: Path, layers: list[dict]) -> ModelSource:
    source = ModelSource(name=name, base="", origin=str(path))
    for layer in layers:
        blob = models_dir / "blobs" / layer["digest"].replace(":", "-")
        kind = layer.get("mediaType", "").removeprefix(MEDIA)
        where = f"the {kind} layer"
        if kind == "model":
            source.base = str(blob)
        elif kind == "adapter":
            source.adapter = blob
        elif kind in TEXT_LAYERS:
            source.settings.append(Setting(TEXT_LAYERS[kind], blob.read_text(), where))
        elif kind == "params":
            for key, value in json.loads(blob.read_text()).items():
                for one in value if isinstance(value, list) else [value]:
                    source.settings.append(Setting("PARAMETER", json.dumps(one), where, key))
        elif kind == "messages":
            for m in json.loads(blob.read_text()):
                source.settings.append(Setting("MESSAGE", m["content"], where, m["role"]))
    if not source.base:
        raise ConfigError(f"{path}: the manifest has no model layer")
    return source


def _check_range(parameters: dict) -> None:
    """The server's check of a model's PARAMETERs when it starts (ollama_models._checked), so none stops it."""
    num_ctx = parameters.get("num_ctx")
    if num_ctx is not None and num_ctx < 2:
        raise ValueError(f"PARAMETER num_ctx = {num_ctx} is invalid; use 2 or more")
    if parameters:
        sampling_params(OllamaOptions.model_validate(parameters), 1, max(num_ctx or 2, 2))


def write_config(sources: list[ModelSource], replicas: dict[str, int], out: Path) -> list[str]:
    """Write the loraplex config for ``sources`` to ``out`` and each endpoint's Modelfile beside it, pointing at
    the files themselves (Ollama's blobs included: GGUF is recognised by its bytes); returns the warnings for
    the user. Everything is checked before anything is written."""
    bases = {s.base for s in sources}
    if len(bases) > 1:
        listing = "; ".join(f"{s.name}: {s.base}" for s in sources)
        raise ConfigError(f"the models do not share one base, so one loraplex worker cannot serve them all: {listing}")
    unknown = set(replicas) - {s.name for s in sources}
    if unknown:
        raise ConfigError(f"--replicas names {', '.join(sorted(unknown))}, which no model is called")
    base = Path(bases.pop())
    if not base.is_file():
        raise ConfigError(
            f"FROM {base} names an Ollama model, not a file; migrate with --from-ollama (its blobs are the files) "
            "or write FROM with the base's .gguf path"
        )
    base = base.resolve()
    aliases = [s.name for s in sources if s.adapter is None and not s.settings]
    # every plain base model is one endpoint now: their replicas add up
    slots = sum(replicas.get(name, 1) for name in aliases) or 1
    endpoints = [EndpointConfig("base", slots=slots, aliases=[a for a in aliases if a != "base"])]
    inputs = {Path(s.origin).resolve() for s in sources}
    modelfiles: dict[Path, str] = {}
    warnings = []
    for source in (s for s in sources if s.name not in aliases):
        adapter = source.adapter.resolve() if source.adapter is not None else None
        name = _safe(source.name)
        path = out.parent / f"{name}{SUFFIX}"
        if path.resolve() in inputs:
            raise ConfigError(f"{path} would overwrite an input Modelfile; write --out into another folder")
        modelfiles[path], left_out = _modelfile(source, base, adapter)
        warnings += [f"{source.name}: {origin}: left out (a comment in {path.name}): {why}" for origin, why in left_out]
        warnings += _context_warning(source)
        slots = replicas.get(source.name, 1)
        endpoints.append(EndpointConfig(name, str(adapter or ""), slots, modelfile=path.name))
    limits = LimitsConfig(
        max_num_seqs=max(64, sum(e.slots for e in endpoints)), max_loras=max(4, sum(bool(e.adapter) for e in endpoints))
    )
    EngineConfig(limits=limits, endpoints=endpoints)  # names and aliases each used once, before anything is written
    text = (
        "# Written by `loraplex migrate`: one worker serves the base and every adapter from one copy of the base;\n"
        "# each endpoint's Modelfile (beside this file) holds its old pod's SYSTEM, PARAMETER, TEMPLATE and MESSAGE.\n"
        f"[model]\npath = {json.dumps(str(base))}\n\n"
        f"[limits]\nmax_num_seqs = {limits.max_num_seqs}\nmax_loras = {limits.max_loras}\n\n"
        '[server]\nhost = "127.0.0.1"\nport = 11434\n\n' + "\n".join(map(_toml, endpoints))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, modelfile in modelfiles.items():
        path.write_text(modelfile)
    out.write_text(text)
    return warnings


def _toml(endpoint: EndpointConfig) -> str:
    lines = ["[[endpoints]]", f"name = {json.dumps(endpoint.name)}"]
    lines += [f"adapter = {json.dumps(endpoint.adapter)}"] if endpoint.adapter else []
    lines.append(f"slots = {endpoint.slots}")
    lines += [f"aliases = {json.dumps(endpoint.aliases)}"] if endpoint.aliases else []
    lines += [f"modelfile = {json.dumps(endpoint.modelfile)}"] if endpoint.modelfile else []
    return "\n".join(lines) + "\n"


def _modelfile(source: ModelSource, base: Path, adapter: Path | None) -> tuple[str, list[tuple[str, str]]]:
    """The endpoint's Modelfile, and (origin, reason) for each line left out as a comment."""
    lines = [
        f"# {source.name}, written by `loraplex migrate` from {source.origin}\n",
        f"FROM {base}\n",
        *([f"ADAPTER {adapter}\n"] if adapter is not None else []),
    ]
    left_out = []
    for setting in source.settings:
        why = setting.refusal()
        if why is None:
            lines.append(setting.line + "\n")
            continue
        left_out.append((setting.origin, why))
        lines.append(f"# left out by loraplex migrate: {why}\n")
        lines += [f"# {line}\n" for line in setting.line.splitlines()]
    return "".join(lines), left_out


def _context_warning(source: ModelSource) -> list[str]:
    """A num_ctx the server will clamp to the written config's max_model_len."""
    max_len = LimitsConfig().max_model_len
    asked = [s for s in source.settings if s.keyword == "PARAMETER" and s.name == "num_ctx" and s.refusal() is None]
    if not asked or parse_modelfile(asked[-1].line).parameters["num_ctx"] <= max_len:
        return []
    return [
        f"{source.name}: {asked[-1].origin}: {asked[-1].line} is above limits.max_model_len = {max_len}; the server "
        "clamps it (raise max_model_len, and num_kv_blocks to hold it, in the config to serve the whole context)"
    ]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def parse_replicas(specs: list[str]) -> dict[str, int]:
    replicas = {}
    for spec in specs:
        name, _, count = spec.partition("=")
        if not name or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--replicas {spec!r}: write NAME=N with N >= 1, e.g. --replicas chatbot=3")
        replicas[name] = int(count)
    return replicas
