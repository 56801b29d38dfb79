"""DeepSeek-V2/V3 multi-head latent attention (MLA).

Queries go through a low-rank latent ``wq_a -> q_norm -> wq_b`` (or a plain ``wq`` when
``q_lora_rank`` is 0). Keys and values come from one latent: ``wkv_a`` maps the hidden state to
``kv_lora_rank`` latent features plus a ``qk_rope_head_dim`` rotary key shared by all heads; the
latent is normed and expanded by ``wkv_b`` into each head's non-rotary key and value. RoPE
touches only the rotary parts; the softmax scale is ``1/sqrt(qk_nope_head_dim +
qk_rope_head_dim)``.

``wq_a`` and ``wkv_a`` read the same input, so they can run as one matmul ``wq_kv_a`` followed by
a split (``fused_mla_lora_proj``, after MaxText; the block is then built fused): the block is a
:class:`FusableProjections`, so fusing, unfusing and adapters packed onto ``wq_kv_a`` are the
same machinery as Llama's Q/K/V fusion (:mod:`edgelora.lora.fusion`), and checkpoints convert
between the layouts with :mod:`edgelora.weights.mla_layout`.

KV cache layout: the **expanded** per-head keys and values, ``[1, n_heads, max_seq_len,
qk_nope+qk_rope]`` and ``[1, n_heads, max_seq_len, v_head_dim]``. That costs ``n_heads *
(qk_nope + qk_rope + v_head_dim)`` floats per token per layer (the compressed latent would cost
``kv_lora_rank + qk_rope_head_dim``), but a decode step then expands only the new token's latent
instead of the whole cache, and ``wkv_b`` stays an ordinary (quantizable, adaptable) linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusableProjections, FusedLinear
from edgelora.models.layers import KVCache, RMSNorm, apply_rope, pair_swap

# DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) use RMSNorm's default eps, not the
# model's rms_norm_eps (both in DeepSeek's reference code and in transformers).
LATENT_NORM_EPS = 1e-6


def cache_floats_per_token(args: ModelArgs) -> dict[str, int]:
    """KV-cache floats per token per layer: this layout, and the compressed-latent one."""
    return {
        "expanded": args.n_heads * (args.qk_head_dim + args.v_head_dim),
        "latent": args.kv_lora_rank + args.qk_rope_head_dim,
    }


class MLAttention(FusableProjections):
    """Multi-head latent attention; ``wq_a``/``wkv_a`` can run fused as ``wq_kv_a``."""

    SPLIT = ("wq_a", "wkv_a")
    FUSED = "wq_kv_a"
    PIECE_SLICES = {"wq_a": ("wq_a",), "wkv_a": ("wkv_a",), "wq_kv_a": ("wq_a", "wkv_a")}

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope = args.qk_nope_head_dim
        self.qk_rope = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.softmax_scale = self.qk_head_dim**-0.5
        q_out = args.n_heads * self.qk_head_dim
        kv_a_out = self.kv_lora_rank + self.qk_rope
        if args.fused_mla_lora_proj:  # the config's layout: one wq_kv_a, no split layers
            self.wq_kv_a = FusedLinear(args.dim, {"wq_a": self.q_lora_rank, "wkv_a": kv_a_out})
        elif self.q_lora_rank:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.wkv_a = nn.Linear(args.dim, kv_a_out, bias=False)
        else:  # no query latent: nothing to fuse, wkv_a is a plain projection
            self.wq = nn.Linear(args.dim, q_out, bias=False)
            self.wkv_a = nn.Linear(args.dim, kv_a_out, bias=False)
            self.SPLIT, self.PIECE_SLICES = (), {}
        if self.q_lora_rank:
            self.q_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(self.q_lora_rank, q_out, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, args.n_heads * (self.qk_nope + self.v_head_dim), bias=False
        )
        self.wo = nn.Linear(args.n_heads * self.v_head_dim, args.dim, bias=False)
        self.kv_cache = KVCache(args.n_heads, args.max_seq_len, self.qk_head_dim, self.v_head_dim)
        # One pair-swap weight per use: a constant shared by two XNNPACK partitions can make
        # ExecuTorch's partitioner build a cyclic partition (seen on MLA).
        self.register_buffer("rope_swap_q", pair_swap(), persistent=False)
        self.register_buffer("rope_swap_k", pair_swap(), persistent=False)

    def get_q_kv_a(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query (all heads, ``[b, seq, n_heads*qk_head_dim]``) and the ``wkv_a`` output
        (``[b, seq, kv_lora_rank + qk_rope]``), from the split layers or the fused one."""
        if not self.q_lora_rank:
            return self.wq(x), self.wkv_a(x)
        q_a, kv_a = self.project(x)
        return self.wq_b(self.q_norm(q_a)), kv_a

    def forward(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        heads = self.n_heads
        q, kv_a = self.get_q_kv_a(x)
        q_nope, q_rope = q.view(bsz, seq, heads, self.qk_head_dim).split(
            [self.qk_nope, self.qk_rope], dim=-1
        )
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin, self.rope_swap_q)], dim=-1)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.qk_rope], dim=-1)
        k_rope = apply_rope(k_rope.view(bsz, seq, 1, self.qk_rope), cos, sin, self.rope_swap_k)
        kv = self.wkv_b(self.kv_norm(latent)).view(bsz, seq, heads, self.qk_nope + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(bsz, seq, heads, self.qk_rope)], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(start, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, heads * self.v_head_dim))
