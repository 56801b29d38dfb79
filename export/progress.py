"""Progress bars for the long loops of an export (quantizing parts, lowering partitions).

A bar is drawn on stderr only when it is a terminal (``tqdm``'s ``disable=None``), so logs and
tests see just the stage lines; it shows the resident memory as it goes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from edgelora._memory import resident_mib

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, *, unit: str = "it", total: int | None = None
) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (elapsed time, rate, RSS)."""
    from tqdm import tqdm

    bar = tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=None, file=sys.stderr)
    for item in bar:
        yield item
        bar.set_postfix_str(f"RSS {resident_mib():.0f} MiB", refresh=False)


class Counter:
    """A bar advanced by callbacks (``counter(done, total)``), e.g. partitions compiled by the
    lowering; close it with :meth:`close`."""

    def __init__(self, desc: str, unit: str = "it") -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=desc, unit=unit, leave=False, disable=None, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)
        self._bar.set_postfix_str(f"RSS {resident_mib():.0f} MiB", refresh=False)

    def close(self) -> None:
        self._bar.close()
