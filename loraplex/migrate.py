"""``loraplex migrate``: the models of the old Ollama pods, as they are, turned into one loraplex config.

Input is either Ollama's models folder (``manifests/`` and ``blobs/``, what each pod served) or the Modelfiles
the pods were built from. Every model must sit on one base (the point of loraplex: one copy of the base); a
model with an ``ADAPTER`` becomes an endpoint serving that adapter (a GGUF LoRA file, as Ollama keeps them, or
a PEFT folder), a model without one an alias of the base endpoint. Replica counts given on the command line
become each endpoint's guaranteed slots.

What a Modelfile says beyond its base and adapter (``SYSTEM``, ``PARAMETER``, ``TEMPLATE``, ``MESSAGE``) is
not applied by loraplex's endpoints yet: it is written into the config as a comment under its endpoint and
listed in the command's warnings, never dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.engine.core.errors import ConfigError
from loraplex.server.modelfile import INSTRUCTIONS, instructions, unquote

# Ollama's media types of a manifest's layers
MODEL_LAYER = "application/vnd.ollama.image.model"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"
TEXT_LAYERS = {
    "application/vnd.ollama.image.system": "system",
    "application/vnd.ollama.image.template": "template",
}
PARAMS_LAYER = "application/vnd.ollama.image.params"
MESSAGES_LAYER = "application/vnd.ollama.image.messages"


@dataclass
class ModelSource:
    """One old pod's model: its base and adapter files and what else its Modelfile set."""

    name: str
    base: str  # a file path, or (from a Modelfile) an Ollama model name
    adapter: Path | None = None
    system: str | None = None
    template: str | None = None
    parameters: dict[str, list[str]] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)

    def unapplied(self) -> list[str]:
        """The settings loraplex does not apply yet, one line each."""
        lines = [f"SYSTEM {json.dumps(self.system)}"] if self.system else []
        lines += [f"PARAMETER {k} {json.dumps(v)}" for k, values in self.parameters.items() for v in values]
        lines += [f"TEMPLATE {json.dumps(self.template)}"] if self.template else []
        lines += [f"MESSAGE {role} {json.dumps(text)}" for role, text in self.messages]
        return lines


def parse_modelfile(text: str, name: str, folder: Path) -> ModelSource:
    """A Modelfile's instructions; relative FROM and ADAPTER paths resolve against ``folder``. An unknown
    instruction is an error naming its line."""
    source = ModelSource(name=name, base="")
    adapters = []
    for number, instruction, argument in instructions(text):
        if instruction not in INSTRUCTIONS:
            raise ConfigError(f"{name}: line {number}: {instruction} is not a Modelfile instruction")
        if not argument:
            raise ConfigError(f"{name}: line {number}: {instruction} needs an argument")
        if instruction == "FROM":
            candidate = (folder / argument).expanduser()
            source.base = str(candidate.resolve()) if candidate.exists() else argument
        elif instruction == "ADAPTER":
            adapters.append((folder / argument).expanduser().resolve())
        elif instruction == "SYSTEM":
            source.system = argument
        elif instruction == "TEMPLATE":
            source.template = argument
        elif instruction == "PARAMETER":
            key, _, value = argument.partition(" ")
            source.parameters.setdefault(key, []).append(unquote(value.strip()))
        elif instruction == "MESSAGE":
            role, _, content = argument.partition(" ")
            source.messages.append((role, unquote(content.strip())))
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
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}: not an Ollama manifest ({e})") from e
        source = ModelSource(name=name, base="")
        for layer in layers:
            blob = models_dir / "blobs" / layer["digest"].replace(":", "-")
            kind = layer.get("mediaType", "")
            if kind == MODEL_LAYER:
                source.base = str(blob)
            elif kind == ADAPTER_LAYER:
                source.adapter = blob
            elif kind in TEXT_LAYERS:
                setattr(source, TEXT_LAYERS[kind], blob.read_text())
            elif kind == PARAMS_LAYER:
                params = json.loads(blob.read_text())
                source.parameters = {
                    k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in params.items()
                }
            elif kind == MESSAGES_LAYER:
                source.messages = [(m["role"], m["content"]) for m in json.loads(blob.read_text())]
        if not source.base:
            raise ConfigError(f"{path}: the manifest has no model layer")
        sources.append(source)
    if not sources:
        raise ConfigError(f"{manifests} holds no manifests")
    return sources


def write_config(sources: list[ModelSource], replicas: dict[str, int], out: Path) -> list[str]:
    """Write the loraplex config for ``sources`` to ``out``, pointing at the files themselves (Ollama's blobs
    included: GGUF is recognised by its bytes); returns the warnings for the user."""
    bases = {s.base for s in sources}
    if len(bases) > 1:
        listing = "; ".join(f"{s.name}: {s.base}" for s in sources)
        raise ConfigError(f"the models do not share one base, so one loraplex worker cannot serve them all: {listing}")
    unknown = set(replicas) - {s.name for s in sources}
    if unknown:
        raise ConfigError(f"--replicas names {', '.join(sorted(unknown))}, which no model is called")
    base = bases.pop()
    if not Path(base).is_file():
        raise ConfigError(
            f"FROM {base} names an Ollama model, not a file; migrate with --from-ollama (its blobs are the files) "
            "or write FROM with the base's .gguf path"
        )
    warnings, blocks = [], []
    base_names = [s.name for s in sources if s.adapter is None]
    # every base-only model is one endpoint now: their replicas add up
    slots = [sum(replicas.get(name, 1) for name in base_names) or 1]
    blocks.append(_endpoint("base", None, slots[0], base_names))
    for source in sources:
        if source.adapter is not None:
            slots.append(replicas.get(source.name, 1))
            blocks.append(_endpoint(source.name, source.adapter.resolve(), slots[-1], []))
        unapplied = source.unapplied()
        if unapplied:
            block = len(blocks) - 1 if source.adapter is not None else 0
            blocks[block] += "".join(f"# not applied yet by loraplex ({source.name}): {line}\n" for line in unapplied)
            warnings.append(f"{source.name}: {len(unapplied)} Modelfile setting(s) not applied yet (see the config)")
    text = (
        "# Written by `loraplex migrate`: one worker serves the base and every adapter from one copy of the base.\n"
        f"[model]\npath = {json.dumps(str(Path(base).resolve()))}\n\n"
        f"[limits]\nmax_num_seqs = {max(64, sum(slots))}\nmax_loras = {max(4, len(slots) - 1)}\n\n"
        '[server]\nhost = "127.0.0.1"\nport = 11434\n\n' + "\n".join(blocks)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return warnings


def _endpoint(name: str, adapter: Path | None, slots: int, aliases: list[str]) -> str:
    lines = ["[[endpoints]]", f'name = "{_safe(name)}"']
    if adapter is not None:
        lines.append(f"adapter = {json.dumps(str(adapter))}")
    lines.append(f"slots = {slots}")
    if aliases:
        lines.append(f"aliases = {json.dumps([a for a in aliases if a != name])}")
    return "\n".join(lines) + "\n"


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
