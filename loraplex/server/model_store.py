"""The models made from Modelfiles: which endpoint each runs on and its defaults, kept on disk so a restarted
server serves them again.

A model is either an endpoint of its own (an adapter put on the base by ``/api/create``, or an endpoint given
a Modelfile at start) or an alias of another endpoint with defaults of its own (``/api/create`` without an
adapter, ``/api/copy``). Those made at run time are written to ``<state_dir>/models/<name>.json``, one file per
model, replaced atomically; ``ollama_models.restore`` serves them again when the server starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex.server.modelfile import ModelSpec

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/loraplex``, else ``~/.local/state/loraplex``."""
    root = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(root) / "loraplex"


@dataclass
class StoredModel:
    """One model and where it runs."""

    name: str
    endpoint: str  # the endpoint its requests run on; == name for a model with an endpoint of its own
    spec: ModelSpec  # its defaults, with what it inherits FROM another model already folded in
    adapter: str | None = None  # the resolved adapter it loaded as its own endpoint (None: an alias)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def is_alias(self) -> bool:
        return self.name != self.endpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "adapter": self.adapter,
            "created_at": self.created_at,
            "spec": self.spec.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredModel:
        return cls(data["name"], data["endpoint"], ModelSpec.from_json(data["spec"]), data.get("adapter"))


class ModelStore:
    """Every model with Modelfile defaults, by name; those made at run time also on disk."""

    def __init__(self, state_dir: str) -> None:
        self.folder = (Path(state_dir).expanduser() if state_dir else default_state_dir()) / "models"
        self.models: dict[str, StoredModel] = {}
        self.lock = asyncio.Lock()  # held by the routes that make, copy or delete models

    def get(self, name: str) -> StoredModel | None:
        return self.models.get(name.removesuffix(":latest"))

    def spec(self, model: str, endpoint: str) -> ModelSpec:
        """The defaults of a request for ``model`` that reached ``endpoint``: the model's own when the name is
        one of them (an alias keeps its own), else the endpoint's, else none."""
        stored = self.get(model)
        if stored is None or stored.endpoint != endpoint:
            stored = self.models.get(endpoint)
        return stored.spec if stored is not None else ModelSpec()

    def aliases(self) -> dict[str, str]:
        """Alias -> endpoint, for every model that is an alias."""
        return {m.name: m.endpoint for m in self.models.values() if m.is_alias}

    def aliases_of(self, endpoint: str) -> list[str]:
        return [m.name for m in self.models.values() if m.is_alias and m.endpoint == endpoint]

    def add(self, model: StoredModel) -> None:
        self.models = {**self.models, model.name: model}  # a new dict: routes may be iterating the old one

    def discard(self, name: str) -> None:
        self.models = {k: v for k, v in self.models.items() if k != name}

    def save(self, model: StoredModel) -> None:
        """Write the model's file atomically: a crash leaves the old file or the new one, never half of one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{model.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(model.to_json(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / f"{model.name}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> None:
        (self.folder / f"{name}.json").unlink(missing_ok=True)

    def saved(self) -> list[StoredModel]:
        """The models on disk, those with an endpoint of their own first (aliases may point at them)."""
        if not self.folder.is_dir():
            return []
        models = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                models.append(StoredModel.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("model file %s cannot be read (%s); skipped, left in place", path, e)
        return sorted(models, key=lambda m: m.is_alias)
