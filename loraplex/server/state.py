"""What the routes share: the configuration, the engine once it is loaded, and the lifecycle flags."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.engine import LLMEngine
from loraplex.server.errors import APIError
from loraplex.server.limits import Admission
from loraplex.server.metrics import ServerMetrics
from loraplex.server.model_store import ModelStore
from loraplex.server.routing import EndpointRouter

log = logging.getLogger(__name__)


class ServerState:
    """One per process. The engine is None until ``load`` finishes, which is what ``/ready`` reports."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.router = EndpointRouter(config)
        self.metrics = ServerMetrics()
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.shutting_down = False
        self.in_flight = 0  # HTTP requests being answered, streams included
        self.admission = Admission(self)  # requests in flight per endpoint and per client (loraplex/server/limits.py)
        self.started_at = datetime.now(UTC)
        self.models = ModelStore(config.server.state_dir)  # models made from Modelfiles (server/model_store.py)
        self.loaded = False  # the engine runs and the models made before a restart serve again

    def load(self) -> None:
        """Build the engine and start its loop; blocking, so run it in a thread."""
        start = time.monotonic()
        log.info("loading model %s", self.config.model.path or "(embedded SmolLM2-135M-Instruct)")
        async_engine = AsyncEngine.build_on_loop_thread(lambda: LLMEngine(self.config))
        engine = async_engine.engine
        for name, adapter in engine.lora.adapters.items():
            log.info(
                "adapter %s: rank %d, targets %s, from %s",
                name,
                adapter.rank,
                ",".join(adapter.target_modules),
                adapter.path,
            )
        self.engine, self.async_engine = engine, async_engine
        self.metrics.bind(async_engine)
        from loraplex.server.ollama_models import restore_blocking  # it serves through this state: imported late

        restore_blocking(self)
        self.loaded = True
        log.info("model %s loaded in %.1f s", engine.model_name, time.monotonic() - start)

    @property
    def ready(self) -> bool:
        return self.loaded and self.async_engine is not None and self.async_engine.is_alive and not self.shutting_down

    def require_engine(self) -> tuple[LLMEngine, AsyncEngine]:
        """The engine, or a 503 that says why there is none to serve this request."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down; retry on another worker")
        if self.engine is None or self.async_engine is None:
            raise APIError(503, "the model is still loading; retry in a few seconds", headers={"Retry-After": "5"})
        return self.engine, self.async_engine

    def close(self) -> None:
        if self.async_engine is not None:
            self.async_engine.shutdown()
