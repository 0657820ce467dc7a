"""Resident memory of this process (Linux ``/proc``): the RSS now, its peak, and the growth of one deployment."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

MB = 2**20


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux: writing 5 to clear_refs), so each phase has its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class ResidentMemory:
    """Memory of one deployment (its load and every run on it): RSS growth from just before it was loaded.

    ``release`` hands back what the previous deployment freed first (the engine's ``return_freed_memory``),
    so that the growth measured is this one's own."""

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        if release is not None:
            release()
        self.rss_before = rss_bytes()
        reset_peak_rss()
        self.loaded_rss = 0

    def loaded(self) -> None:
        self.loaded_rss = rss_bytes() - self.rss_before

    @contextlib.contextmanager
    def measure(self, memory: dict) -> Iterator[None]:
        """Fill ``memory`` with the RSS growth after load and the peak while the block runs."""
        reset_peak_rss()
        yield
        memory["rss_after_load_mb"] = round(self.loaded_rss / MB, 1)
        memory["peak_rss_growth_mb"] = round((peak_rss_bytes() - self.rss_before) / MB, 1)
