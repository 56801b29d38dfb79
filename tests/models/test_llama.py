"""The Llama model against an independent, cache-free reference written with complex RoPE."""

import torch
import torch.nn.functional as F

from edgelora.models.args import ModelArgs
from edgelora.models.layers import CustomKVCache
from edgelora.models.llama import build_model

from ..tiny import TINY_2L

ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16, rope_theta=500.0
)


def reference_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's reference formulation: complex-number RoPE, full causal attention, no cache."""
    a = model.args
    seq = tokens.shape[1]
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2).double() / a.head_dim))
    rot = torch.polar(
        torch.ones(seq, a.head_dim // 2, dtype=torch.float64),
        torch.outer(torch.arange(seq).double(), freqs),
    )

    def rope(x):  # x: [b, seq, heads, head_dim]
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).float()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    h = model.tok_embeddings.weight[tokens]
    for layer in model.layers:
        att = layer.attention
        x = rms(h, layer.attention_norm.weight)
        q = rope((x @ att.wq.weight.T).view(1, seq, a.n_heads, a.head_dim))
        k = rope((x @ att.wk.weight.T).view(1, seq, a.kv_heads, a.head_dim))
        v = (x @ att.wv.weight.T).view(1, seq, a.kv_heads, a.head_dim)
        rep = a.n_heads // a.kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / a.head_dim**0.5
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, seq, -1)
        h = h + out @ att.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(h, model.norm.weight) @ model.output.weight.T


def test_prefill_matches_reference():
    model = build_model(ARGS, seed=3)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        got = model(tokens, torch.tensor([0]))
        want = reference_logits(model, tokens)
    assert got.shape == (1, 8, ARGS.vocab_size)
    # fp32 vs a float64-RoPE reference: differences are rounding only.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_kv_cache_decode_matches_prefill():
    model = build_model(ARGS, seed=4)
    tokens = torch.tensor([[7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        full = model(tokens, torch.tensor([0]))
        model.reset_cache()
        model(tokens[:, :2], torch.tensor([0]))  # prefill two, then one token at a time
        steps = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-4)


def test_module_names_follow_executorch_llama():
    names = set(build_model(ARGS).state_dict())
    for key in (
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.1.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ):
        assert key in names
    assert not any("cache" in n or "freqs" in n for n in names)  # runtime state is not saved


def test_build_model_is_deterministic():
    a, b = build_model(ARGS, seed=5), build_model(ARGS, seed=5)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert not torch.equal(build_model(ARGS, seed=6).output.weight, a.output.weight)


def test_custom_ops_attention_matches_plain():
    """ExecuTorch's llama::update_cache + llama::custom_sdpa kernels, eager, against the plain
    path: one pass and incremental decode within 1e-6 (the same math; measured ~3e-8)."""
    args = ModelArgs.from_dict(TINY_2L)
    plain_model = build_model(args, seed=4)
    model = build_model(args, seed=4, sdpa="custom")
    assert all(isinstance(m.attention.kv_cache, CustomKVCache) for m in model.layers)
    tokens = torch.arange(3, 13).view(1, -1)
    with torch.no_grad():
        plain = plain_model(tokens, torch.tensor([0]))
        one_pass = model(tokens, torch.tensor([0]))
        model.reset_cache()
        steps = [model(tokens[:, :4], torch.tensor([0]))]
        steps += [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(4, 10)]
    assert (one_pass - plain).abs().max() < 1e-6
    assert (torch.cat(steps, 1) - plain).abs().max() < 1e-6
    last = build_model(args, seed=4, logits="last")  # one row through the output layer: the
    with torch.no_grad():  # same products, another GEMM blocking (1e-6)
        assert (last(tokens, torch.tensor([0])) - plain[:, -1:]).abs().max() < 1e-6
