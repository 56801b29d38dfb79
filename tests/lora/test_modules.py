import math

import pytest
import torch
from torch import nn

from edgelora.lora.modules import LoRALinear
from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model


def _lora(rank=4, alpha=8.0, rslora=False, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias)
    m = LoRALinear(base, rank=rank, alpha=alpha, use_rslora=rslora)
    nn.init.normal_(m.lora_b.weight)
    return m


@pytest.mark.parametrize("rslora, scale", [(False, 8.0 / 4), (True, 8.0 / math.sqrt(4))])
def test_forward_is_the_lora_formula(rslora, scale):
    m = _lora(rslora=rslora)
    x = torch.randn(3, 12)
    W, b = m.linear.weight, m.linear.bias
    A, B = m.lora_a.weight, m.lora_b.weight
    want = x @ W.T + b + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(m(x), want)
    assert m.scale == pytest.approx(scale)


def test_fresh_adapter_is_identity_and_properties_forward():
    base = nn.Linear(12, 10)
    m = LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(2, 12)
    torch.testing.assert_close(m(x), base(x))  # lora_b starts at zero
    assert m.weight is base.weight and m.bias is base.bias
    assert (m.in_features, m.out_features) == (12, 10)
    assert set(dict(m.named_children())) == {"linear", "lora_a", "lora_b"}
    assert m.lora_a.bias is None and m.lora_b.bias is None
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base, rank=0, alpha=1)


def test_pre_wrapping_state_dict_is_remapped():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, max_seq_len=8)
    plain = build_model(args, seed=1)
    old_sd = plain.state_dict()  # keys like layers.0.attention.wq.weight
    wrapped = build_model(args, seed=2)
    wrapped.layers[0].attention.wq = LoRALinear(wrapped.layers[0].attention.wq, rank=2, alpha=2)
    result = wrapped.load_state_dict(old_sd, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == [
        "layers.0.attention.wq.lora_a.weight",
        "layers.0.attention.wq.lora_b.weight",
    ]
    assert torch.equal(
        wrapped.layers[0].attention.wq.linear.weight, plain.layers[0].attention.wq.weight
    )
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # lora_b is zero: the wrapped model reproduces the plain one
        torch.testing.assert_close(
            wrapped(tokens, torch.tensor([0])), plain(tokens, torch.tensor([0]))
        )
    assert "layers.0.attention.wq.linear.weight" in wrapped.state_dict()
