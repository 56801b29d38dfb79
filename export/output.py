"""Output directory handling: refuse to clobber another model's export, commit so that ``OUT``
is always a complete export, one writer at a time.

- **Every commit is one swap.** A whole export is staged in ``.OUT.staging-XXXX/stage`` beside
  ``OUT``; an update (``--add-to``, ``--overwrite``, ``--remove``) stages the new export there
  too, as hard links to the files it keeps (no copy: they keep their bytes, inode and
  modification time) beside its new files and manifest. Every file and directory of the stage
  is fsynced, then the stage and ``OUT`` are swapped in one ``renameat2(RENAME_EXCHANGE)``:
  there is no moment without a complete ``OUT``, old or new, and the old one, now in the
  staging directory, is removed with it. A kill before the swap leaves the old export and a
  staging directory the next writer removes; after it, the new export.
- **Where paths cannot be swapped** (not Linux, or a file system without it), a commit record
  ``.OUT.commit.json`` names the finished stage first; then ``OUT`` is renamed aside to
  ``.OUT.previous`` and the stage into place. The next writer finishes a commit a kill
  interrupted, and puts ``.OUT.previous`` back if it is the only copy.
- **One writer**: every writer holds ``.OUT.lock`` (an advisory ``flock``, released by the kernel
  when the process dies, SIGKILL included) for its whole run. Holding it, a writer first
  completes or rolls back what a killed one left (:func:`_recover`). The lock is named from
  ``OUT`` with its parent's symlinks resolved, so aliases share it; a symlinked ``OUT`` is
  refused, a symlinked lock is refused, a symlinked temporary file is replaced, never followed.

Readers verify every file against the manifest's sha256 before use, and read again if the
manifest changed meanwhile (:func:`edgelora.format.manifest.read_export`): a reader that races
a commit sees the old export or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from edgelora import _fs
from edgelora.errors import OutputError, ProgramError
from edgelora.format.layout import MANIFEST_FILE, check_file_name
from edgelora.format.manifest import Manifest


def real_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` made absolute with its parent's symlinks resolved (so every spelling of one
    directory names one lock); :class:`OutputError` if ``out_dir`` itself is a symlink."""
    path = Path(os.path.abspath(out_dir))
    if not path.name:
        raise OutputError(f"{out_dir}: not a directory an export can be written to")
    real = Path(os.path.realpath(path.parent)) / path.name
    if real.is_symlink():
        raise OutputError(
            f"{out_dir}: is a symlink (to {os.readlink(real)}); give the directory it points to"
        )
    return real


def _existing_manifest(out_dir: Path) -> Manifest | None:
    try:
        return Manifest.read(out_dir)
    except ProgramError as e:
        raise OutputError(str(e)) from None


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Fail early if ``out_dir`` holds files that are not an edgelora export (unless overwrite)."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and _existing_manifest(out_dir) is None:
        raise OutputError(
            f"{out_dir}: not empty and not an edgelora export; pass --overwrite to replace it"
        )


def commit_output(stage: Path, out_dir: Path, foundation_sha: str, *, overwrite: bool) -> None:
    """Make the finished ``stage`` directory ``out_dir`` (see the module docstring).

    An existing export is replaced only if it was built on the same foundation (or with
    ``overwrite``): a directory holding another model's foundation is refused.
    """
    exists = os.path.lexists(out_dir)
    if exists:
        old = None
        if out_dir.is_dir() and not overwrite:
            old = _existing_manifest(out_dir)
        old_sha = None if old is None else old.foundation_sha256
        if not overwrite and any(out_dir.iterdir()) and old_sha != foundation_sha:
            raise OutputError(
                f"{out_dir}: holds an export with a different foundation "
                f"(sha256 {str(old_sha)[:12]}..., new {foundation_sha[:12]}...); "
                "pass --overwrite to replace it"
            )
    _swap_in(stage, out_dir)


def _swap_in(stage: Path, out_dir: Path) -> None:
    """fsync ``stage`` and make it ``out_dir``: one rename, or one swap (after which ``stage``
    holds the previous export, dropped with the staging directory), or two steps."""
    _fs.fsync_tree(stage)
    if not os.path.lexists(out_dir):
        os.rename(stage, out_dir)
    elif not _fs.exchange(stage, out_dir):
        _commit_in_two_steps(stage, out_dir)
        return
    _fs.fsync_path(out_dir.parent)


def commit_record(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.commit.json"


def _previous(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.previous"


def _commit_in_two_steps(stage: Path, out_dir: Path) -> None:
    """The commit where paths cannot be swapped: record it, rename ``OUT`` aside, rename the
    stage into place, drop the record (:func:`_recover` finishes it after a kill)."""
    record = commit_record(out_dir)
    _fs.write_atomic(record, json.dumps({"stage": str(stage.relative_to(out_dir.parent))}).encode())
    _finish_commit(stage, out_dir)


def _finish_commit(stage: Path, out_dir: Path) -> None:
    previous = _previous(out_dir)
    if os.path.lexists(out_dir) and not os.path.lexists(previous):
        os.rename(out_dir, previous)
        _fs.fsync_path(out_dir.parent)
    try:
        os.rename(stage, out_dir)
    except OSError:
        if os.path.lexists(previous) and not os.path.lexists(out_dir):
            os.rename(previous, out_dir)  # put the old export back before saying why
        raise
    _fs.fsync_path(out_dir.parent)
    os.unlink(commit_record(out_dir))
    _fs.fsync_path(out_dir.parent)
    _remove(previous)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _recover(out_dir: Path, log) -> None:
    """Complete or roll back what a killed writer left (the caller holds the lock)."""
    record = commit_record(out_dir)
    half_written = record.with_name(f".{record.name}.tmp")  # (_fs.write_atomic's)
    if os.path.lexists(half_written):
        os.unlink(half_written)
    if os.path.lexists(record):
        stage = _recorded_stage(record, out_dir)
        if stage.is_dir():
            log(f"  finishing the commit of {out_dir}, interrupted by a writer that was stopped")
            _finish_commit(stage, out_dir)
        else:  # the stage was renamed into place: only the record was left
            os.unlink(record)
            _fs.fsync_path(out_dir.parent)
    previous = _previous(out_dir)
    if os.path.lexists(previous):
        if not os.path.lexists(out_dir):  # never the only copy: put it back
            log(f"  restoring {out_dir} from {previous.name}")
            os.rename(previous, out_dir)
            _fs.fsync_path(out_dir.parent)
        else:
            _remove(previous)
    for stale in sorted(out_dir.parent.glob(glob.escape(staging_prefix(out_dir)) + "*")):
        log(f"  removing {stale.name}, left by a writer that did not finish")
        _remove(stale)


def _recorded_stage(record: Path, out_dir: Path) -> Path:
    try:
        if not stat.S_ISREG(os.lstat(record).st_mode) or os.path.getsize(record) > 4096:
            raise ValueError("not a small regular file")
        stage = json.loads(record.read_bytes())["stage"]
        head, _, tail = stage.partition("/")
        if not head.startswith(staging_prefix(out_dir)) or tail != "stage":
            raise ValueError(f"stage {stage!r} is not one of this export's staging directories")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise OutputError(
            f"{record}: unreadable commit record ({e}); move it away and check {out_dir}"
        ) from None
    return out_dir.parent / stage


def commit_update(
    out_dir: Path, stage: Path, manifest: Manifest, new_files: dict[str, Path], gone: list[str]
) -> None:
    """Commit an update: ``stage`` (a new directory ``.OUT.staging-XXXX/stage``) becomes the export
    ``manifest`` describes -- ``new_files`` (final name -> a written file on the same file
    system) added or replacing their namesakes, ``gone`` left out, every other file of
    ``out_dir`` hard-linked -- and is swapped in (see the module docstring). The caller holds
    the lock."""
    for name in [*new_files, *gone]:
        check_file_name(name, "file")
    stage.mkdir()
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if entry.name in new_files or entry.name in gone or entry.name == MANIFEST_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, stage / entry.name, symlinks=True, copy_function=_link)
        else:
            _link(entry.path, stage / entry.name)
    for name, src in new_files.items():
        os.replace(src, stage / name)
    manifest.write(stage)
    _swap_in(stage, out_dir)


def _link(src: str, dst: str | Path) -> None:
    """A hard link (the same inode: bytes and times kept), or a copy where links fail."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def lock_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _open_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(
            f"{path}: cannot open the writer lock ({e.strerror}"
            + ("; it is a symlink: remove it" if os.path.islink(path) else "")
            + ")"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path}: the writer lock is not a regular file; remove it")
    return fd


@contextlib.contextmanager
def export_lock(out_dir: Path, *, log=print) -> Iterator[Path]:
    """Hold ``out_dir``'s writer lock; if another export or update holds it, say so and wait.
    Then complete or roll back what a killed writer left (:func:`_recover`). Yields ``out_dir``
    as :func:`real_out_dir` spells it. The lock file is removed on release (a waiter that locked
    the removed file notices and locks the new one)."""
    out_dir = real_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = lock_file(out_dir)
    told = False
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                log(f"  waiting for {holder or 'another process'} to finish writing {out_dir} ...")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we locked: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv[:1])})\n".encode(), 0)
        _recover(out_dir, log)
        yield out_dir
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def staging_prefix(out_dir: Path) -> str:
    """Name prefix of a whole export's staging directory beside ``out_dir``."""
    return f".{out_dir.name}.staging-"
