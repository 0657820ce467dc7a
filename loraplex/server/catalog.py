"""What the server says about its models: each endpoint described as Ollama and OpenAI list models.

An endpoint is the base model plus, optionally, one adapter; sizes, digests and dates come from the files
on disk, so two workers serving the same files describe them identically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex.engine.core.config import EndpointConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.engine.core.errors import UnknownEndpointError

_QUANTIZATION_LEVELS = {"nf4": "NF4", "int8": "INT8"}
_DTYPE_LEVELS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _files_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def _mtime(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Ollama writes times."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parameter_size(count: int) -> str:
    """Ollama's style: 134.5M, 8.0B."""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


@dataclass
class ModelEntry:
    """One endpoint as a model, under its own name or an alias made by /api/create or /api/copy."""

    endpoint: EndpointConfig
    engine: LLMEngine
    alias: str | None = None

    @property
    def name(self) -> str:
        return self.alias or self.endpoint.name

    @property
    def adapter_path(self) -> Path | None:
        return Path(self.endpoint.adapter) if self.endpoint.adapter else None

    @property
    def tag(self) -> str:
        return f"{self.name}:latest"

    @property
    def size(self) -> int:
        adapter = self.adapter_path
        return _files_size(Path(self.engine.model_path)) + (_files_size(adapter) if adapter else 0)

    @property
    def digest(self) -> str:
        key = f"{self.engine.model_path}\n{self.endpoint.adapter}".encode()
        return hashlib.sha256(key).hexdigest()

    @property
    def modified_at(self) -> datetime:
        return _mtime(self.adapter_path or Path(self.engine.model_path))

    @property
    def family(self) -> str:
        return self.engine.model.config.model_type

    def details(self) -> dict[str, Any]:
        model_config = self.engine.config.model
        num_params = sum(p.numel() for p in self.engine.model.parameters())
        quantization = _QUANTIZATION_LEVELS.get(model_config.quantization) or _DTYPE_LEVELS[model_config.dtype]
        return {
            "parent_model": self.engine.model_name if self.adapter_path else "",
            "format": "safetensors",
            "family": self.family,
            "families": [self.family],
            "parameter_size": parameter_size(num_params),
            "quantization_level": quantization,
        }

    def adapter(self) -> dict[str, Any] | None:
        adapter = self.engine.lora.adapters.get(self.endpoint.name)
        if adapter is None:
            return None
        return {
            "name": adapter.name,
            "path": str(adapter.path),
            "rank": adapter.rank,
            "scaling": adapter.scaling,
            "target_modules": list(adapter.target_modules),
            "slot": self.engine.lora.slot_of.get(adapter.name),
            "resident": adapter.name in self.engine.lora.slot_of,
        }

    def tags_entry(self) -> dict[str, Any]:
        return {
            "name": self.tag,
            "model": self.tag,
            "modified_at": iso(self.modified_at),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def entries(engine: LLMEngine, only: str | None = None, aliases: dict[str, str] | None = None) -> list[ModelEntry]:
    """Every endpoint served now (adapters loaded at run time included, unloaded ones not), or just ``only``;
    then each of ``aliases`` (alias -> endpoint) whose endpoint is among them."""
    served = engine.endpoint_adapters
    listed = [
        ModelEntry(e, engine) for e in engine.config.endpoints if (only is None or e.name == only) and e.name in served
    ]
    by_name = {entry.endpoint.name: entry.endpoint for entry in listed}
    return listed + [
        ModelEntry(by_name[endpoint], engine, alias)
        for alias, endpoint in (aliases or {}).items()
        if endpoint in by_name
    ]


def entry(engine: LLMEngine, endpoint: str) -> ModelEntry:
    """The endpoint as a model; 404 if its adapter was unloaded (at run time) since it was resolved."""
    found = engine.config.endpoint(endpoint)
    if found is None or found.name not in engine.endpoint_adapters:
        raise UnknownEndpointError(f"model {endpoint!r} is not served here (its adapter was unloaded)")
    return ModelEntry(found, engine)
