"""Output directory handling: refuse to clobber another model's export, write atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from edgelora.errors import OutputError

FOUNDATION_FILE = "foundation.ptd"
MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputError(f"{path}: unreadable manifest ({e})") from None


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Fail early if ``out_dir`` holds files that are not an edgelora export (unless overwrite)."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and read_manifest(out_dir) is None:
        raise OutputError(
            f"{out_dir}: not empty and not an edgelora export; pass --overwrite to replace it"
        )


def commit_output(stage: Path, out_dir: Path, foundation_sha: str, *, overwrite: bool) -> None:
    """Move the finished ``stage`` directory to ``out_dir``.

    An existing export is replaced only if it was built on the same foundation (or with
    ``overwrite``): a directory holding another model's foundation is refused.
    """
    if out_dir.exists():
        old = read_manifest(out_dir) if out_dir.is_dir() else None
        old_sha = (old or {}).get("files", {}).get(FOUNDATION_FILE, {}).get("sha256")
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
