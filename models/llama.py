"""A Llama transformer: RMSNorm, RoPE, grouped-query attention with a static KV cache, SwiGLU.

Module names follow ExecuTorch's Llama (``tok_embeddings``, ``layers.N.attention.wq``,
``layers.N.feed_forward.w1/w2/w3``, ``norm``, ``output``) so its checkpoints load unchanged.
``forward(tokens, input_pos)`` is the signature ExecuTorch's LLM runner calls: ``tokens`` is
``[1, seq]`` int64 and ``input_pos`` is ``[1]`` int64 holding the position of ``tokens[0, 0]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelora.errors import ConfigError
from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusableProjections
from edgelora.models.layers import (
    CustomKVCache,
    KVCache,
    RMSNorm,
    apply_rope,
    require_custom_ops,
    rope_tables,
)
from edgelora.models.mla import MLAttention


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

    def __init__(self, args: ModelArgs, custom_sdpa: bool = False) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        cache = CustomKVCache if custom_sdpa else KVCache
        self.kv_cache = cache(args.kv_heads, args.max_seq_len, args.head_dim, args.head_dim)

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
        if isinstance(self.kv_cache, CustomKVCache):
            # ExecuTorch's kernels: in-place cache write, causal SDPA from ``start`` (GQA aware).
            # They take fp32 (as ExecuTorch's example, fp16 runs them in fp32).
            k, v = self.kv_cache.update(start, k.float(), v.float())
            out = torch.ops.llama.custom_sdpa(q.float(), k, v, start, None, 0.0, True)
            return self.wo(out.to(x.dtype).reshape(bsz, seq, -1))
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
    def __init__(self, args: ModelArgs, *, custom_sdpa: bool = False) -> None:
        super().__init__()
        self.attention = MLAttention(args) if args.is_mla else Attention(args, custom_sdpa)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), start, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


SDPA_MODES = ("plain", "custom")
LOGITS_MODES = ("all", "last")


class Transformer(nn.Module):
    """The Llama decoder: ``forward(tokens [1, seq], input_pos [1])`` returns float32 logits
    ``[1, seq, vocab_size]``.

    Settings that change the traced program are fixed at construction:

    * ``sdpa="custom"`` runs GQA attention on ExecuTorch's ``llama::update_cache`` /
      ``llama::custom_sdpa`` kernels (in-place cache, fused causal SDPA) instead of plain
      PyTorch ops (MLA keeps the plain path: its value head size differs from the key's);
      :class:`DependencyError` if the ops cannot be loaded;
    * ``logits="last"`` returns the last position's logits only (``[1, 1, vocab_size]``): a
      generating app reads only that row, and computing the output layer (the largest matmul of
      a small model) for it alone halves a stories15M prefill.
    """

    def __init__(self, args: ModelArgs, *, sdpa: str = "plain", logits: str = "all") -> None:
        super().__init__()
        if sdpa not in SDPA_MODES:
            raise ConfigError(f"sdpa must be one of {SDPA_MODES}, got {sdpa!r}")
        if logits not in LOGITS_MODES:
            raise ConfigError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
        if sdpa == "custom" and not args.is_mla:
            require_custom_ops()
        self.args = args
        self.sdpa = "plain" if args.is_mla else sdpa
        self.logits = logits
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, custom_sdpa=self.sdpa == "custom") for _ in range(args.n_layers)
        )
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
        if self.logits == "last":
            h = h[:, -1:, :]
        return self.output(self.norm(h)).float()

    def projections(self) -> tuple[str, ...]:
        """Every adaptable projection of a layer, as paths inside a ``TransformerBlock``."""
        args = self.args
        if args.is_mla:
            q = ("attention.wq_a", "attention.wq_b") if args.q_lora_rank else ("attention.wq",)
            attn = (*q, "attention.wkv_a", "attention.wkv_b", "attention.wo")
        else:
            attn = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
        return (*attn, "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # HF order

    def reset_cache(self) -> None:
        """Zero every layer's KV cache (start a new sequence in eager mode)."""
        for layer in self.layers:
            layer.attention.kv_cache.k_cache.zero_()
            layer.attention.kv_cache.v_cache.zero_()


def build_model(
    args: ModelArgs, *, seed: int | None = 0, sdpa: str = "plain", logits: str = "all"
) -> Transformer:
    """A ``Transformer`` in eval mode with deterministic random weights (``seed``); ``sdpa`` and
    ``logits`` as :class:`Transformer` takes them."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model = Transformer(args, sdpa=sdpa, logits=logits)
        # Small init keeps a random deep model's logits in a sane range.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "tok_embeddings" not in name else 1.0)
    return model.eval()
