"""Read a small JSON config file, turning every failure into one named error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 << 20  # a config, manifest or shard index is kilobytes; refuse a bomb


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


def read_json(
    path: str | Path, error: type[Exception], what: str, *, max_bytes: int = MAX_JSON_BYTES
) -> Any:
    """Parse ``path``; raise ``error`` naming the file for a missing, oversized or malformed
    one (a digit bomb, nesting too deep to parse, bytes that are not UTF-8 ...)."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise error(f"{path}: {what} of {size} bytes is larger than {max_bytes} bytes")
        return json.loads(path.read_bytes(), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{path}: not a readable JSON file ({e})") from None
    except RecursionError:
        raise error(f"{path}: not a readable JSON file (nested too deeply)") from None
