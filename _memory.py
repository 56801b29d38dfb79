"""This process's memory, read from Linux ``/proc`` (``getrusage`` elsewhere)."""

from __future__ import annotations

import sys


def _ru_maxrss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_mib() -> float:
    """Resident memory now, in MiB (``VmRSS``; elsewhere the peak so far)."""
    kib = _status_kib("VmRSS")
    return _ru_maxrss_mib() if kib is None else kib / 1024


def peak_rss_mib() -> float:
    """Peak resident memory so far, in MiB: ``VmHWM`` (``ru_maxrss`` would include a larger
    parent's peak, which it inherits across fork and exec)."""
    kib = _status_kib("VmHWM")
    return _ru_maxrss_mib() if kib is None else kib / 1024


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    After a program is lowered, gigabytes of freed buffers can stay in the allocator's heap
    (glibc raises its mmap threshold as large blocks are freed), counted as resident for the
    rest of the export; trimming returns them."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)
