"""Output directory handling: refuse to clobber another model's export, write atomically, one
writer at a time.

A whole export is staged in ``.OUT.staging-XXXX`` beside ``OUT`` and renamed into place; an update
(``--add-to``, ``--remove``) writes each new file under a hidden temporary name inside ``OUT``,
renames it to its final name, and replaces ``manifest.json`` last, so a kill at any point leaves
the previous export complete (a file the manifest does not list is not part of the export).
Every writer holds ``.OUT.lock`` (an advisory ``flock``, released by the kernel when the
process dies, SIGKILL included; the file is removed when a writer finishes) for its whole run; holding it, a writer removes what a killed
one left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from edgelora.errors import OutputError, ProgramError
from edgelora.format.manifest import Manifest


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
    """Move the finished ``stage`` directory to ``out_dir``.

    An existing export is replaced only if it was built on the same foundation (or with
    ``overwrite``): a directory holding another model's foundation is refused.
    """
    if out_dir.exists():
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
        trash = stage.parent / "previous"
        os.replace(out_dir, trash)
        os.replace(stage, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, out_dir)


TEMP_PREFIX = ".edgelora-tmp-"  # files being written inside an export directory


def lock_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


@contextlib.contextmanager
def export_lock(out_dir: Path, *, log=print) -> Iterator[None]:
    """Hold ``out_dir``'s writer lock; if another export or update holds it, say so and wait.
    Then remove what a killed writer left: staging directories beside ``out_dir`` and
    temporary files inside it. The lock file is removed on release (a waiter that locked the
    removed file notices and locks the new one)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = lock_file(out_dir)
    told = False
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                f.seek(0)
                holder = f.read().strip() or "another process"
                log(f"  waiting for {holder} to finish writing {out_dir} ...")
                told = True
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder removed the file we locked: lock the current one
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({' '.join(sys.argv[:1])})\n")
        f.flush()
        for stale in _leftovers(out_dir):
            log(f"  removing {stale.name}, left by an export that did not finish")
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def staging_prefix(out_dir: Path) -> str:
    """Name prefix of a whole export's staging directory beside ``out_dir``."""
    return f".{out_dir.name}.staging-"


def _leftovers(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.parent.glob(staging_prefix(out_dir) + "*") if p.is_dir()]
    if out_dir.is_dir():
        found += out_dir.glob(TEMP_PREFIX + "*")
    return sorted(found)


def place_file(out_dir: Path, name: str, write) -> Path:
    """Write ``out_dir/name`` atomically: ``write(path)`` fills a temporary file in ``out_dir``,
    which is flushed to disk and renamed to ``name``."""
    tmp = out_dir / f"{TEMP_PREFIX}{name}"
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / name)
    return out_dir / name
