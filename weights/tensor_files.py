"""Tensor files: read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``, write one.

``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: never unpickled
beyond tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import CheckpointError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file, by key."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to load: the file holds pickled objects other than tensors "
                f"(loaded with weights_only=True; {str(e).splitlines()[0]})"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
        return sd
    raise CheckpointError(
        f"{path}: unknown checkpoint format {path.suffix!r} (use .safetensors or .pth)"
    )


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
