"""File names of an export directory, and the file hash every record uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

FOUNDATION_FILE = "foundation.ptd"
MANIFEST_FILE = "manifest.json"
BUNDLE_FILE = "bundle.pte"
SWITCHABLE_FILE = "switchable.pte"
TEMPLATE_FILE = "template.pte"
BASE_PROGRAM = "base"
# Names an adapter may not take: they are (or prefix) the files above.
RESERVED_NAMES = ("base", "foundation", "manifest")


def program_file(name: str) -> str:
    """``NAME.pte``: the program of adapter ``name`` (or of the base model, ``base``)."""
    return f"{name}.pte"


def adapter_inputs_file(name: str) -> str:
    """``NAME.lora.safetensors``: adapter ``name``'s run-time inputs for ``switchable.pte``."""
    return f"{name}.lora.safetensors"


_sha_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (cached per path, size and mtime within this process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]
