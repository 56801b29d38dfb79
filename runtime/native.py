"""What native code may do to a command's output and speed: its log lines, and its threads.

ExecuTorch's log lines (``[stats.h:188] ...``, ``[cpuinfo_utils.cpp:109] ...``,
``PyTorchObserver {...}``) reach the output two ways: C++ code writes to the process's file
descriptors 1 and 2, and the Python bindings route ``ET_LOG`` through Python's
``sys.stderr``. :func:`native_output` sends both to a log file (or ``/dev/null``): descriptors
1 and 2 and ``sys.stdout``/``sys.stderr`` all point there, and what a command means to print
goes to :data:`TERMINAL`'s ``out``/``err``, the original standard output and error.

:func:`set_threads` sizes the XNNPACK/ExecuTorch threadpool every program of the process runs
on; it must be called before the first program is loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from edgelora.errors import ProgramError


class _Terminal:
    """Where a command's own output goes: ``out`` and ``err`` (outside :func:`native_output`:
    ``sys.stdout`` and ``sys.stderr`` as they are)."""

    _streams: tuple | None = None

    @property
    def out(self):
        return sys.stdout if self._streams is None else self._streams[0]

    @property
    def err(self):
        return sys.stderr if self._streams is None else self._streams[1]


TERMINAL = _Terminal()


@contextlib.contextmanager
def native_output(log_file: Path | None = None, *, verbose: bool = False) -> Iterator[None]:
    """Inside: everything but :data:`TERMINAL` writes to ``log_file`` (appended; ``None``:
    dropped). ``verbose``: change nothing (the native lines reach the terminal)."""
    if verbose:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        target = os.open(
            log_file if log_file is not None else os.devnull,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o644,
        )
    except OSError as e:
        raise ProgramError(f"{log_file}: cannot open the native log ({e.strerror})") from None
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    streams, outer = (sys.stdout, sys.stderr), TERMINAL._streams
    log = _reopen(target, sys.stderr)
    try:
        TERMINAL._streams = (_terminal(sys.stdout, 1, saved[1]), _terminal(sys.stderr, 2, saved[2]))
        sys.stdout = sys.stderr = log
        for fd in (1, 2):
            os.dup2(target, fd)
        yield
    finally:
        for stream in (log, *TERMINAL._streams):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        _flush_c_stdio()  # native printf output still buffered belongs in the log too
        for fd, dup in saved.items():
            os.dup2(dup, fd)
        sys.stdout, sys.stderr = streams
        TERMINAL._streams = outer
        for fd in (*saved.values(), target):
            os.close(fd)


@contextlib.contextmanager
def terminal_streams() -> Iterator[None]:
    """Inside :func:`native_output`: point ``sys.stdout``/``sys.stderr`` back at the terminal
    for a while (a step whose own Python output should be seen, such as an export's
    progress lines)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TERMINAL.out, TERMINAL.err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _flush_c_stdio() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _terminal(stream, fd: int, saved: int):
    """Where ``stream`` (``sys.stdout``/``sys.stderr`` on entry) wrote: through ``saved``, the
    copy of descriptor ``fd``, if it wrote to ``fd``; else itself (a stream on no descriptor,
    such as pytest's ``capsys``)."""
    try:
        if stream.fileno() == fd:
            return _reopen(saved, stream)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        pass
    return stream


def _reopen(fd: int, like) -> io.TextIOWrapper:
    """A text stream on ``fd`` (not closing it), line-buffered like the terminal's."""
    encoding = getattr(like, "encoding", None) or "utf-8"
    return io.TextIOWrapper(
        os.fdopen(fd, "wb", buffering=0, closefd=False),
        encoding=encoding,
        errors=getattr(like, "errors", None) or "strict",
        line_buffering=True,
        write_through=True,
    )


def set_threads(threads: int | None) -> int:
    """Size the runtime's threadpool (``None``: keep the default, one thread per core as
    ``cpuinfo`` counts them); returns the size in effect."""
    from executorch.extension.pybindings import portable_lib

    if threads is not None:
        if threads < 1:
            raise ProgramError(f"--threads must be >= 1, got {threads}")
        portable_lib._unsafe_reset_threadpool(threads)
    return int(portable_lib._threadpool_get_thread_count())
