"""File names of an export directory, and the file hash every record uses."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from edgelora.errors import ProgramError

FOUNDATION_FILE = "foundation.ptd"
MANIFEST_FILE = "manifest.json"
BUNDLE_FILE = "bundle.pte"
SWITCHABLE_FILE = "switchable.pte"
TEMPLATE_FILE = "template.pte"
BASE_PROGRAM = "base"
# Names an adapter may not take: they are (or prefix) the files above.
RESERVED_NAMES = ("base", "bundle", "foundation", "manifest", "switchable", "template")

# A file an export directory holds: one plain name, no directory part, no leading dot (hidden
# names are the writers' temporary files), nothing a shell or another system would mangle.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


def check_file_name(name: object, what: str = "file", error: type[Exception] = ProgramError) -> str:
    """``name`` if it is a plain file name an export may hold (``tokenizer.json``); ``error``
    naming it if it is anything else (``../x``, ``/etc/passwd``, ``a/b``, ``.hidden``, ``""``)."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name.endswith(".tmp"):
        raise error(f"{what} {name!r} is not a plain file name in the export directory")
    return name


def program_file(name: str) -> str:
    """``NAME.pte``: the program of adapter ``name`` (or of the base model, ``base``)."""
    return f"{name}.pte"


def adapter_inputs_file(name: str) -> str:
    """``NAME.lora.safetensors``: adapter ``name``'s run-time inputs for ``switchable.pte``."""
    return f"{name}.lora.safetensors"


_sha_cache: dict[tuple[int, ...], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, cached within this process per file identity: device,
    inode, size, and modification and change times (a rewrite changes the change time, which
    no user call can set back)."""
    path = Path(path)
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]
