"""A Llama transformer: RMSNorm, RoPE, grouped-query attention with a static KV cache, SwiGLU.

Module names follow ExecuTorch's Llama (``tok_embeddings``, ``layers.N.attention.wq``,
``layers.N.feed_forward.w1/w2/w3``, ``norm``, ``output``) so its checkpoints load unchanged.
``forward(tokens, input_pos)`` is the signature ExecuTorch's LLM runner calls: ``tokens`` is
``[1, seq]`` int64 and ``input_pos`` is ``[1]`` int64 holding the position of ``tokens[0, 0]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusableProjections


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _llama3_scale_freqs(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    # Llama 3.1's long-context rope scaling (transformers' "llama3" rope type).
    factor, old_context_len = args.rope_scale_factor, args.rope_original_max_seq_len
    low_freq_factor, high_freq_factor = args.rope_low_freq_factor, args.rope_high_freq_factor
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_mid, mid, scaled)


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables of shape ``[max_seq_len, head_dim // 2]`` (Meta's convention)."""
    half = args.head_dim // 2
    freqs = 1.0 / (
        args.rope_theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / args.head_dim)
    )
    if args.use_scaled_rope:
        freqs = _llama3_scale_freqs(freqs, args)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), freqs)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])``; ``x`` is ``[b, seq, heads, head_dim]``."""
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static ``[1, n_kv_heads, max_seq_len, head_dim]`` caches written in place at ``input_pos``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        shape = (1, args.kv_heads, args.max_seq_len, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def update(
        self, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = k.size(2)
        self.k_cache.narrow(2, start, seq).copy_(k)
        self.v_cache.narrow(2, start, seq).copy_(v)
        return self.k_cache, self.v_cache


class Attention(FusableProjections):
    """Grouped-query attention. ``wq``/``wk``/``wv`` can run fused as ``wqkv`` (slices with
    their GQA sizes); adapter pieces named ``wqkv`` or ``wkv`` cover several slices."""

    SPLIT = ("wq", "wk", "wv")
    FUSED = "wqkv"
    PIECE_SLICES = {
        "wq": ("wq",),
        "wk": ("wk",),
        "wv": ("wv",),
        "wkv": ("wk", "wv"),
        "wqkv": ("wq", "wk", "wv"),
    }

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache = KVCache(args)

    def get_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value projections of ``x`` (``[b, seq, out]`` each), from the
        split layers or the fused one."""
        return self.project(x)

    def forward(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self.get_qkv(x)
        q = apply_rope(q.view(bsz, seq, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(bsz, seq, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(bsz, seq, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(start, k, v)
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(FusableProjections):
    """SwiGLU: ``w2(silu(w1(x)) * w3(x))`` (w1 = gate, w3 = up, w2 = down). ``w1``/``w3`` can
    run fused as ``w13``."""

    SPLIT = ("w1", "w3")
    FUSED = "w13"
    PIECE_SLICES = {"w1": ("w1",), "w3": ("w3",), "w13": ("w1", "w3")}

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def get_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate (``w1``) and up (``w3``) projections of ``x``, split or fused."""
        return self.project(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.get_gate_up(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), start, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama decoder. ``forward`` returns logits ``[1, seq, vocab_size]`` (float32)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        for i, layer in enumerate(self.layers):  # names for error messages
            layer.attention.fqn = f"layers.{i}.attention"
            layer.feed_forward.fqn = f"layers.{i}.feed_forward"
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        causal = torch.full((args.max_seq_len, args.max_seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", causal, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq = tokens.size(1)
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seq <= self.args.max_seq_len)
        cos = self.freqs_cos.narrow(0, start, seq)
        sin = self.freqs_sin.narrow(0, start, seq)
        mask = self.mask.narrow(0, start, seq)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, start, cos, sin, mask)
        return self.output(self.norm(h)).float()

    def _blocks(self, kind: type) -> list[FusableProjections]:
        return [m for m in self.modules() if isinstance(m, kind)]

    def fuse_qkv_projections(self, inplace: bool = False) -> None:
        """Fuse every layer's ``wq``/``wk``/``wv`` into ``wqkv`` (see
        :meth:`FusableProjections.fuse_projections`)."""
        for block in self._blocks(Attention):
            block.fuse_projections(inplace)

    def unfuse_qkv_projections(self) -> None:
        for block in self._blocks(Attention):
            block.unfuse_projections()

    def fuse_gate_up_projections(self, inplace: bool = False) -> None:
        """Fuse every layer's ``w1``/``w3`` (gate/up) into ``w13``."""
        for block in self._blocks(FeedForward):
            block.fuse_projections(inplace)

    def unfuse_gate_up_projections(self) -> None:
        for block in self._blocks(FeedForward):
            block.unfuse_projections()

    def restore_checkpoint_fusion_state(self) -> None:
        """Put every block back in the layout its checkpoint had (``checkpoint_fused``): a
        natively fused checkpoint's blocks fused, a split one's split.

        Call it before attaching an adapter trained on the checkpoint's layout after fusing or
        unfusing for speed, and before saving a state dict meant to match the checkpoint.
        """
        for block in self._blocks(FusableProjections):
            if block.checkpoint_fused:
                block.fuse_projections(inplace=True)
            else:
                block.unfuse_projections()

    def reset_cache(self) -> None:
        """Zero every layer's KV cache (start a new sequence in eager mode)."""
        for layer in self.layers:
            layer.attention.kv_cache.k_cache.zero_()
            layer.attention.kv_cache.v_cache.zero_()


def build_model(args: ModelArgs, *, seed: int | None = 0) -> Transformer:
    """A ``Transformer`` in eval mode with deterministic random weights (``seed``)."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model = Transformer(args)
        # Small init keeps a random deep model's logits in a sane range.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "tok_embeddings" not in name else 1.0)
    return model.eval()
