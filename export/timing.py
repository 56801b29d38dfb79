"""Stage timing: every long step of an export prints its duration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB: ``VmHWM`` on Linux (``ru_maxrss``
    would include a larger parent's peak, which it inherits across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


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
