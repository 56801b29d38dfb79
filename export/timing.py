"""Stage timing: every long step of an export prints its duration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StageTimer:
    """``with timer("name"): ...`` logs ``[name] ...`` then ``[name] 1.23 s`` and records it."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.durations: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        yield
        self.durations[name] = time.perf_counter() - start
        self.log(f"[{name}] {self.durations[name]:.2f} s")
