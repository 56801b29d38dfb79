"""The file-system steps every writer uses, each durable on return: a file written under a
temporary name, flushed and renamed; a directory fsynced after a rename inside it; two paths
swapped in one step.

A SIGKILL loses nothing the kernel has; a power cut loses what was not fsynced. So a file is
fsynced before the rename that publishes it, and the directory after (the rename itself is a
write to the directory). ``tests/export/test_crash.py`` counts these calls and stops a writer
at each one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (symlinks are not followed)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(dirpath)


def create_new(path: str | Path) -> int:
    """An fd on a new regular file at ``path``; an existing file or symlink there is removed
    first (never followed). Callers hold the directory's writer lock."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o644)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a temporary file beside it, fsynced,
    renamed over it, and the directory fsynced (a kill leaves the old file or the new)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = create_new(tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_path(path.parent)


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` if this system or file system cannot, so the caller must do it in two."""
    if os.environ.get("EDGELORA_NO_EXCHANGE"):
        return False
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_LIBC: list = []


def _libc():
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]
