"""``AsyncEngine.build_on_loop_thread``: the engine is built on the thread that steps it, and a failed build
reaches the caller instead of leaving a dead loop behind."""

from __future__ import annotations

import threading

import pytest

from loraplex.engine.core.async_engine import AsyncEngine


class _IdleEngine:
    """Only what the loop touches while nothing is submitted (a thread test, not a model test)."""

    def __init__(self) -> None:
        self.built_on = threading.current_thread()

    def has_unfinished(self) -> bool:
        return False


def test_engine_is_built_on_the_loop_thread() -> None:
    async_engine = AsyncEngine.build_on_loop_thread(_IdleEngine)
    try:
        assert async_engine.is_alive
        assert async_engine.engine.built_on is async_engine.thread
        assert async_engine.thread is not threading.current_thread()
    finally:
        async_engine.shutdown()
    assert not async_engine.thread.is_alive()


def test_build_error_reaches_the_caller() -> None:
    def broken() -> _IdleEngine:
        raise ValueError("no model at this path")

    with pytest.raises(ValueError, match="no model at this path"):
        AsyncEngine.build_on_loop_thread(broken)
