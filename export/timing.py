"""Stage timing: every long step of an export prints its duration, the peak resident memory
during the step and the process's peak so far."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgelora._memory import peak_rss_mib, resident_mib

_SAMPLE_S = 0.05  # how often a stage's resident memory is sampled


class StageTimer:
    """``with timer("name"): ...`` logs ``[name] ...`` then ``[name] 1.23 s (peak RSS N MiB,
    so far M MiB)`` and records the duration, the stage's own peak (sampled every 50 ms by a
    thread, so a step shorter than that may read low) and the peak so far."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.durations: dict[str, float] = {}
        self.stage_peak_mib: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"[{name}] ...")
        peak = [resident_mib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(_SAMPLE_S):
                peak[0] = max(peak[0], resident_mib())

        sampler = threading.Thread(target=sample, name="edgelora-rss", daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            sampler.join()
        self.durations[name] = time.perf_counter() - start
        self.peak_rss_mib[name] = peak_rss_mib()
        self.stage_peak_mib[name] = max(peak[0], resident_mib())
        self.log(
            f"[{name}] {self.durations[name]:.2f} s (peak RSS {self.stage_peak_mib[name]:.0f} "
            f"MiB, so far {self.peak_rss_mib[name]:.0f} MiB)"
        )
