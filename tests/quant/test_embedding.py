import pytest
import torch

from edgelora.errors import ConfigError
from edgelora.models.llama import build_model
from edgelora.quant.embedding import quantize_embedding


@pytest.mark.parametrize("bits, levels", [(4, 7), (8, 127)])
def test_embedding_quantization_error_bound(tiny_args, bits, levels):
    m = build_model(tiny_args)
    w = m.tok_embeddings.weight.detach().clone()
    report = quantize_embedding(m, bits, 32)
    deq = m.tok_embeddings.weight.dequantize()
    groups = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)
    # Per group: |w - deq| <= half a quantization step (max|w_group| / levels / 2), + fp slack.
    err = (deq - w).reshape_as(groups.expand(-1, -1, 32)).abs()
    assert (err <= groups / levels / 2 * 1.01 + 1e-6).all()
    assert report.max_abs_err == pytest.approx((deq - w).abs().max().item())
    assert f"int{bits} g32" in report.summary_line()
    out = m.tok_embeddings(torch.tensor([[3, 5]]))
    torch.testing.assert_close(out, deq[[3, 5]].unsqueeze(0))


def test_embedding_options(tiny_args):
    m = build_model(tiny_args)
    assert quantize_embedding(m, 0, 32).summary_line().endswith("kept float")
    with pytest.raises(ConfigError, match="divide the embedding dim 64"):
        quantize_embedding(m, 4, 48)
    with pytest.raises(ConfigError, match="bits"):
        quantize_embedding(m, 3, 32)
