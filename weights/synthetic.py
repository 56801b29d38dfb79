"""Deterministic random adapters for demos, tests and benchmarks (never for real weights)."""

from __future__ import annotations

import torch
from torch import nn

from edgelora.lora.record import Adapter, LoRAWeights, validate_adapter_name
from edgelora.weights.families import all_projections


def _to_module(name: str) -> str:
    """A Hugging Face projection name (any family's) -> its path inside a TransformerBlock;
    a path is kept."""
    return all_projections().get(name, (None, name))[1]


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
    paths = [_to_module(t) for t in (targets or model.projections())]
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


def reservation_adapter(args, targets: tuple[str, ...], rank: int) -> Adapter:
    """An all-zero adapter of ``rank`` on ``targets`` of every layer (``("all",)``: every
    projection): what ``--switchable-slots`` adds to the adapters a switchable program's slots
    are fitted to, so adapters made later find room. ``targets`` are Hugging Face projection
    names (``q_proj``) or paths inside a layer (``attention.wq``)."""
    import dataclasses

    from edgelora.errors import ConfigError
    from edgelora.lora.fusion import set_fusion
    from edgelora.models.llama import build_model

    # split projections, whatever the export fuses: adapters name the pieces
    model = build_model(dataclasses.replace(args, fused_mla_lora_proj=False), empty=True)
    set_fusion(model, "none")
    paths = list(model.projections())
    if targets != ("all",):
        paths = []
        for t in targets:
            path = _to_module(t)
            if path not in model.projections():
                raise ConfigError(
                    f"--switchable-slots: {t!r} is not a projection of this model (have "
                    f"{', '.join(model.projections())} or their Hugging Face names)"
                )
            paths.append(path)
    adapter = Adapter(name="reserved", source=f"--switchable-slots rank {rank}")
    for i in range(len(model.layers)):
        for path in paths:
            lin = model.get_submodule(f"layers.{i}.{path}")
            adapter.modules[f"layers.{i}.{path}"] = LoRAWeights(
                torch.zeros(rank, lin.in_features), torch.zeros(lin.out_features, rank), rank
            )
    return adapter
