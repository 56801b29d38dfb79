"""Fault injection for writers, SQLite-style: run one ``export_llama`` command with every
file-system call under a directory counted, and stop it at the k-th.

``python -m edgelora.tests.export.faults ROOT MODE ARG -- EXPORT_LLAMA_ARGS...``

Counted: ``open``/``os.open`` for writing, ``os.write``, ``os.replace``, ``os.rename``,
``os.link``, ``os.unlink``/``os.remove``, ``os.rmdir``, ``os.mkdir``, ``shutil.rmtree``,
``os.fsync``, ``os.ftruncate`` and the swap (``edgelora._fs.exchange``), each when its path is
under ROOT (or given relative to a directory fd, or by an fd on a file under ROOT).

- ``MODE kill K``: SIGKILL this process just before the K-th call (what a crash leaves).
- ``MODE snapshot DIR``: before every call, copy ROOT to ``DIR/<k>`` (the hooks off meanwhile),
  and at the end write ``DIR/calls.json`` (the calls in order). Copying reads what the kernel
  has, so ``DIR/<k>`` is what a SIGKILL before call k would have left; the test checks that for
  a few k against real kills.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Counter:
    def __init__(self, root: Path, mode: str, arg: str) -> None:
        self.root, self.mode, self.arg = str(root), mode, arg
        self.calls: list[str] = []
        self.busy = False

    def under(self, path, kwargs) -> bool:
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
            return True
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        try:
            path = os.fsdecode(path)
        except TypeError:
            return False
        return os.path.abspath(path).startswith(self.root + os.sep)

    def tick(self, name: str, path) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            k = len(self.calls) + 1
            if self.mode == "kill" and k == int(self.arg):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "snapshot":
                shutil.copytree(self.root, Path(self.arg) / str(k), symlinks=True)
            self.calls.append(f"{name} {os.path.relpath(os.fsdecode(path), self.root)}")
        finally:
            self.busy = False

    def wrap(self, module, name: str, path_of=lambda a, k: a[0] if a else None, when=None):
        original = getattr(module, name)

        def counted(*a, **k):
            path = path_of(a, k)
            if (when is None or when(a, k)) and path is not None and self.under(path, k):
                if isinstance(path, int):
                    path = os.readlink(f"/proc/self/fd/{path}")
                self.tick(f"{module.__name__}.{name}", path)
            return original(*a, **k)

        setattr(module, name, counted)

    def install(self) -> None:
        try:
            from edgelora import _fs
        except ImportError:  # (the commit code before the swap had no _fs)
            _fs = None

        def writing_mode(a, k):
            mode = a[1] if len(a) > 1 else k.get("mode", "r")
            return isinstance(mode, str) and any(c in mode for c in "wax+")

        def writing_flags(a, k):
            flags = a[1] if len(a) > 1 else k.get("flags", 0)
            return bool(flags & _WRITE_FLAGS)

        for module in (builtins, io):
            self.wrap(module, "open", when=writing_mode)
        self.wrap(os, "open", when=writing_flags)
        for name in ("write", "replace", "rename", "link", "unlink", "remove", "rmdir", "mkdir"):
            self.wrap(os, name)
        for name in ("fsync", "ftruncate"):
            self.wrap(os, name)
        self.wrap(shutil, "rmtree")
        if _fs is not None:
            self.wrap(_fs, "exchange")


def main(argv: list[str]) -> int:
    root, mode, arg = argv[0], argv[1], argv[2]
    assert argv[3] == "--"
    counter = Counter(Path(root).resolve(), mode, arg)
    from edgelora.export.cli import main as export_main

    counter.install()
    code = export_main(argv[4:])
    if mode == "snapshot":
        (Path(arg) / "calls.json").write_text(json.dumps(counter.calls, indent=0))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
