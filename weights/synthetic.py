"""Deterministic random adapters for demos, tests and benchmarks (never for real weights)."""

from __future__ import annotations

import torch
from torch import nn

from edgelora.lora.record import Adapter, LoRAWeights, validate_adapter_name
from edgelora.weights.hf_names import ALL_PROJECTIONS

# Hugging Face projection name -> path of the module inside a TransformerBlock.
_HF_TO_MODULE = {proj: ours for proj, (_, ours) in ALL_PROJECTIONS.items()}


def random_adapter(
    model: nn.Module,
    name: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | None = None,
    seed: int = 0,
    std: float = 0.1,
) -> Adapter:
    """A deterministic adapter with non-zero A and B on ``targets`` of every layer.

    ``targets`` are Hugging Face projection names (``q_proj`` ...) or paths inside a layer
    (``attention.wq_a``); by default every projection of the model (``model.projections()``).
    """
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=validate_adapter_name(name), source=f"random(seed={seed})")
    paths = [_HF_TO_MODULE.get(t, t) for t in (targets or model.projections())]
    for i in range(len(model.layers)):
        for path in paths:
            fqn = f"layers.{i}.{path}"
            lin = model.get_submodule(fqn)
            a = torch.randn(rank, lin.in_features, generator=gen) * std
            b = torch.randn(lin.out_features, rank, generator=gen) * std
            adapter.modules[fqn] = LoRAWeights(a, b, alpha)
    return adapter


def random_peft_adapter(model: nn.Module, path, args, name: str, **kwargs) -> Adapter:
    """:func:`random_adapter` written as a PEFT directory at ``path`` and read back from it --
    the adapter as a user's ``--lora`` would give it (``kwargs`` as for :func:`random_adapter`)."""
    from edgelora.weights.adapter_files import load_adapter, save_peft_adapter

    adapter = random_adapter(model, name, **kwargs)
    return load_adapter(save_peft_adapter(adapter, path, args), args, name)
