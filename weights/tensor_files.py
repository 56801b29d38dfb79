"""Tensor files: read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``, write one.

``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: never unpickled
beyond tensors.

A checkpoint's ``.safetensors`` can be read lazily (:func:`read_state_dict` with ``lazy=True``):
each tensor is a view of its own private memory map of the file, in the file's dtype, so nothing
is read until a tensor is used, and its pages are returned when the tensor is freed (or, after a
read-only pass, by :func:`all_finite`). A ``.pth`` is memory-mapped by ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The attribute of a lazily read tensor holding the memory map it views (see all_finite).
_MAP_ATTR = "_edgelora_mmap"


def read_state_dict(path: str | Path, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file, by key (``lazy``: memory-mapped,
    read on first use; see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if not lazy:
                return load_file(str(path))
            with safe_open(str(path), framework="pt"):  # validates the header and offsets
                pass
            return _map_safetensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=lazy)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to load: the file holds pickled objects other than tensors "
                f"(loaded with weights_only=True; {str(e).splitlines()[0]})"
            ) from None
        except Exception as e:  # noqa: BLE001 - torch.load parses untrusted bytes; fuzzing
            # found AttributeError and IndexError besides RuntimeError/EOFError/ValueError
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
        return sd
    raise CheckpointError(
        f"{path}: unknown checkpoint format {path.suffix!r} (use .safetensors or .pth)"
    )


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Each tensor of a (validated) safetensors file as a view of its own private map."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        fd = f.fileno()
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if begin == end:
                out[key] = torch.empty(shape, dtype=dtype)
                continue
            start = 8 + n + begin
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, end + 8 + n - aligned, offset=aligned, access=mmap.ACCESS_COPY)
            count = (end - begin) // dtype.itemsize
            t = torch.frombuffer(mm, dtype=dtype, count=count, offset=start - aligned)
            out[key] = t = t.view(shape)
            setattr(t, _MAP_ATTR, mm)
    return out


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether ``t`` holds no NaN/inf, checked ``chunk`` values at a time (no full-size
    temporary); a lazily read tensor's pages are given back afterwards (it stays readable)."""
    flat = t.reshape(-1)
    ok = all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))
    mm = getattr(t, _MAP_ATTR, None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)
    return ok


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict as ``.safetensors`` or ``.pth`` (by suffix)."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path
