"""Output directory handling: refuse to clobber another model's export, write atomically."""

from __future__ import annotations

import os
import shutil
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
