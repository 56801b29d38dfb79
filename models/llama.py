"""A Llama transformer: RMSNorm, RoPE, grouped-query attention with a static KV cache, SwiGLU.

Module names follow ExecuTorch's Llama (``tok_embeddings``, ``layers.N.attention.wq``,
``layers.N.feed_forward.w1/w2/w3``, ``norm``, ``output``) so its checkpoints load unchanged.
``forward(tokens, input_pos)`` is the signature ExecuTorch's LLM runner calls: ``tokens`` is
``[1, seq]`` int64 and ``input_pos`` is ``[1]`` int64 holding the position of ``tokens[0, 0]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from edgelora.errors import ConfigError
from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusableProjections
from edgelora.models.layers import (
    CustomKVCache,
    KVCache,
    RMSNorm,
    TokenEmbedding,
    apply_rope,
    pair_swap,
    require_custom_ops,
    rope_tables,
)
from edgelora.models.mla import MLAttention


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(FusableProjections):
    """Grouped-query attention. ``wq``/``wk``/``wv`` can run fused as ``wqkv`` (slices with
    their GQA sizes); adapter pieces named ``wqkv`` or ``wkv`` cover several slices.

    The family features are config fields: biases, an explicit head size, per-head q/k norms
    before rotary, no rotary (``use_rope=False``), a softmax scale, soft-capped scores, and a
    sliding window (given as the mask). ``custom_sdpa`` runs ExecuTorch's in-place KV cache and
    fused SDPA kernels; the caller uses them only where they express the attention (no
    soft-capping, no sliding window)."""

    SPLIT = ("wq", "wk", "wv")
    FUSED = "wqkv"
    PIECE_SLICES = {
        "wq": ("wq",),
        "wk": ("wk",),
        "wv": ("wv",),
        "wkv": ("wk", "wv"),
        "wqkv": ("wq", "wk", "wv"),
    }

    def __init__(
        self, args: ModelArgs, *, custom_sdpa: bool = False, use_rope: bool = True
    ) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = hd = args.head_dim
        self.use_rope = use_rope
        # One pair-swap weight per use: a constant shared by two XNNPACK partitions can make
        # ExecuTorch's partitioner build a cyclic partition (seen on MLA).
        self.register_buffer("rope_swap_q", pair_swap(), persistent=False)
        self.register_buffer("rope_swap_k", pair_swap(), persistent=False)
        self.scale = args.attention_scale if args.attention_scale is not None else hd**-0.5
        self.softcap = args.attn_logit_softcap
        bias = args.attention_bias
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=bias)
        self.wk = nn.Linear(args.dim, args.kv_heads * hd, bias=bias)
        self.wv = nn.Linear(args.dim, args.kv_heads * hd, bias=bias)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=args.attention_out_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(hd, args.norm_eps, args.norm_offset)
        cache = CustomKVCache if custom_sdpa else KVCache
        self.kv_cache = cache(args.kv_heads, args.max_seq_len, hd, hd)

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
        q = q.view(bsz, seq, self.n_heads, self.head_dim)
        k = k.view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seq, self.n_kv_heads, self.head_dim)
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q = apply_rope(q, cos, sin, self.rope_swap_q)
            k = apply_rope(k, cos, sin, self.rope_swap_k)
        if isinstance(self.kv_cache, CustomKVCache):
            # ExecuTorch's kernels: in-place cache write, causal SDPA from ``start`` (GQA aware).
            # They take fp32 (as ExecuTorch's example, fp16 runs them in fp32).
            k, v = self.kv_cache.update(start, k.float(), v.float())
            out = torch.ops.llama.custom_sdpa(q.float(), k, v, start, None, 0.0, True, self.scale)
            return self.wo(out.to(x.dtype).reshape(bsz, seq, -1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(start, k, v)
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:  # soft-capped scores: the softmax by hand
            scores = _softcap(q.float() @ k.float().transpose(-1, -2) * self.scale, self.softcap)
            out = torch.softmax(scores + mask, dim=-1).to(v.dtype) @ v
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # GELU's tanh approximation written out: XNNPACK lowers aten.gelu(approximate="tanh") to
    # its erf GELU, which differs by up to ~1e-3 (measured on the Gemma 3 test model).
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


_ACTS = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


class FeedForward(FusableProjections):
    """Gated MLP: ``w2(act(w1(x)) * w3(x))`` (w1 = gate, w3 = up, w2 = down; ``act`` silu
    (SwiGLU) or tanh-approximated GELU). ``w1``/``w3`` can run fused as ``w13``."""

    SPLIT = ("w1", "w3")
    FUSED = "w13"
    PIECE_SLICES = {"w1": ("w1",), "w3": ("w3",), "w13": ("w1", "w3")}

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        hidden, bias = args.ffn_hidden_dim, args.mlp_bias
        self.act = _ACTS[args.hidden_act]
        self.w1 = nn.Linear(args.dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, args.dim, bias=bias)
        self.w3 = nn.Linear(args.dim, hidden, bias=bias)

    def get_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate (``w1``) and up (``w3``) projections of ``x``, split or fused."""
        return self.project(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.get_gate_up(x)
        return self.w2(self.act(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block; with ``sandwich_norms`` (Gemma 3) attention and MLP outputs are
    normed too before the residual add, and ``residual_scale`` (Granite) scales both branches."""

    def __init__(self, args: ModelArgs, layer: int = 0, *, custom_sdpa: bool = False) -> None:
        super().__init__()
        self.kind = args.layer_type(layer)
        if args.is_mla:
            self.attention = MLAttention(args)
        else:
            use_rope = layer not in args.nope_layers
            self.attention = Attention(args, custom_sdpa=custom_sdpa, use_rope=use_rope)
        self.feed_forward = FeedForward(args)
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_offset)  # noqa: E731
        self.attention_norm = norm()
        self.ffn_norm = norm()
        if args.sandwich_norms:
            self.post_attention_norm = norm()
            self.post_ffn_norm = norm()
        self.residual_scale = args.residual_scale

    def _branch(self, out: torch.Tensor, post: str) -> torch.Tensor:
        if post in self._modules:
            out = self._modules[post](out)
        return out if self.residual_scale == 1.0 else out * self.residual_scale

    def forward(self, x, start, cos, sin, mask):
        attn = self.attention(self.attention_norm(x), start, cos, sin, mask)
        h = x + self._branch(attn, "post_attention_norm")
        return h + self._branch(self.feed_forward(self.ffn_norm(h)), "post_ffn_norm")


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
        self.tok_embeddings = TokenEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, custom_sdpa=self.uses_custom_sdpa(i))
            for i in range(args.n_layers)
        )
        for i, layer in enumerate(self.layers):  # names for error messages
            layer.attention.fqn = f"layers.{i}.attention"
            layer.feed_forward.fqn = f"layers.{i}.feed_forward"
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        causal = torch.full((args.max_seq_len, args.max_seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", causal, persistent=False)
        if "sliding" in (args.layer_types or ()):
            # Sliding layers see the last sliding_window positions (themselves included), with
            # their own rotary base.
            cos, sin = rope_tables(args, local=True)
            self.register_buffer("freqs_cos_local", cos, persistent=False)
            self.register_buffer("freqs_sin_local", sin, persistent=False)
            old = torch.full_like(causal, float("-inf")).tril(-args.sliding_window)
            self.register_buffer("mask_local", causal + old, persistent=False)

    def uses_custom_sdpa(self, layer: int) -> bool:
        """Whether layer ``layer`` runs ExecuTorch's custom SDPA: with ``sdpa="custom"``, where
        it expresses the attention (not MLA, sliding windows or soft-capped scores)."""
        args = self.args
        return (
            self.sdpa == "custom"
            and args.layer_type(layer) == "full"
            and args.attn_logit_softcap is None
        )

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        args = self.args
        seq = tokens.size(1)
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seq <= args.max_seq_len)
        tables = {}
        for kind, suffix in (("full", ""), ("sliding", "_local")):
            if kind == "full" or hasattr(self, "mask_local"):
                tables[kind] = tuple(
                    getattr(self, name + suffix).narrow(0, start, seq)
                    for name in ("freqs_cos", "freqs_sin", "mask")
                )
        h = self.tok_embeddings(tokens)
        if args.embedding_scale != 1.0:  # in the compute dtype, as transformers does
            h = h * torch.tensor(args.embedding_scale, dtype=h.dtype)
        for layer in self.layers:
            cos, sin, mask = tables[layer.kind]
            h = layer(h, start, cos, sin, mask)
        if self.logits == "last":
            h = h[:, -1:, :]
        logits = self.output(self.norm(h)).float()
        if args.logits_scaling != 1.0:
            logits = logits / args.logits_scaling
        return _softcap(logits, args.final_logit_softcap)

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


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device (no memory kept) and their
    buffers (rotary tables, masks, KV caches) real: the weights are to be assigned from a
    checkpoint (``load_state_dict(assign=True)``). Through PyTorch's own global parameter
    registration hook, removed on exit (nothing of PyTorch is replaced)."""

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None):
        if param is not None and param.device.type != "meta":
            return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        yield
    finally:
        handle.remove()


def build_model(
    args: ModelArgs,
    *,
    seed: int | None = 0,
    sdpa: str = "plain",
    logits: str = "all",
    empty: bool = False,
) -> Transformer:
    """A ``Transformer`` in eval mode with deterministic random weights (``seed``); ``sdpa`` and
    ``logits`` as :class:`Transformer` takes them. ``empty=True``: parameters on the meta device,
    for a checkpoint to be assigned (see :func:`parameters_on_meta`)."""
    if empty:
        with parameters_on_meta():
            return Transformer(args, sdpa=sdpa, logits=logits).eval()
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model = Transformer(args, sdpa=sdpa, logits=logits)
        # Small init keeps a random deep model's logits in a sane range.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "tok_embeddings" not in name else 1.0)
    return model.eval()
