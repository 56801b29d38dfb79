"""Adapter types behind a dispatcher (``lora/attach.py``): the first dispatcher that returns a
wrapper wraps the layer, so a new adapter type is one function in ``DISPATCHERS``; a layer no
type takes is refused naming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgelora.errors import AdapterError
from edgelora.lora import attach
from edgelora.lora.modules import LoRALinear
from edgelora.lora.record import Adapter, LoRAWeights


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6, bias=False)
        self.norm = nn.LayerNorm(8)


def _adapter(fqn: str, out_f: int = 6) -> Adapter:
    w = LoRAWeights(torch.randn(2, 8), torch.randn(out_f, 2), alpha=4.0)
    return Adapter("a", {fqn: w}, source="test")


def test_lora_linear_is_the_default_type():
    model = attach.attach_adapter(Block(), _adapter("proj"))
    assert type(model.proj) is LoRALinear
    x = torch.randn(3, 8)
    want = model.proj.linear(x) + 2.0 * model.proj.lora_b(model.proj.lora_a(x))  # alpha/r = 2
    torch.testing.assert_close(model.proj(x), want)  # (same ops; float32 rounding only)


def test_a_dispatcher_added_first_takes_the_layer(monkeypatch):
    class Marked(LoRALinear):
        pass

    seen = []

    def dispatch_marked(base, w, scale):
        seen.append(type(base).__name__)
        return Marked.from_base(base, w, multiplier=scale) if isinstance(base, nn.Linear) else None

    monkeypatch.setattr(attach, "DISPATCHERS", [dispatch_marked, *attach.DISPATCHERS])
    model = attach.attach_adapter(Block(), _adapter("proj"))
    assert type(model.proj) is Marked and seen == ["Linear"]
    attach.detach_adapters(model)
    assert type(model.proj) is nn.Linear


def test_a_layer_no_type_wraps_is_named():
    with pytest.raises(AdapterError, match="norm is a LayerNorm, which no adapter type wraps"):
        attach.attach_adapter(Block(), _adapter("norm", out_f=8))


def test_shapes_are_checked_before_dispatch():
    with pytest.raises(AdapterError, match=r"proj is \[6 x 8\] so lora_A must be \[2, 8\]"):
        attach.attach_adapter(Block(), _adapter("proj", out_f=5))
