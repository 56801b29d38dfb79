"""Stage timing: every long step of an export prints its duration and the peak memory so far."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgelora._memory import peak_rss_mib


class StageTimer:
    """``with timer("name"): ...`` logs ``[name] ...`` then ``[name] 1.23 s (peak RSS so far
    N MiB)`` and records both."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.durations: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        yield
        self.durations[name] = time.perf_counter() - start
        self.peak_rss_mib[name] = peak_rss_mib()
        self.log(
            f"[{name}] {self.durations[name]:.2f} s (peak RSS so far "
            f"{self.peak_rss_mib[name]:.0f} MiB)"
        )
