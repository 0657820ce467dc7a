"""loraplex: one base model, many LoRA adapters, one continuous batch.

``engine/`` is the in-process engine (no HTTP), ``server/`` the Ollama- and OpenAI-compatible HTTP server in front
of it, ``cli.py`` the ``loraplex`` command that starts either. Arrows point down only: cli → server → engine.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraplex")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0"
