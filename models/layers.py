"""Layers shared by the attention variants: RMSNorm, rotary embeddings, a static KV cache."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgelora.errors import DependencyError
from edgelora.models.args import ModelArgs


class RMSNorm(nn.Module):
    """``x / rms(x) * (offset + weight)``: Llama's ``offset`` is 0, Gemma's 1 (its weights are
    stored as offsets from one)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = float(offset)
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(mean_last(xf.pow(2)) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).type_as(x)
        return normed.type_as(x) * self.weight


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table may be stored in a narrower float dtype than the model
    computes in: with ``out_dtype`` set, looked-up rows are cast to it. A bf16 or fp16
    checkpoint's table kept as it is and cast after the lookup gives exactly the rows of the
    table upcast first, at half the bytes in memory and in ``foundation.ptd``."""

    out_dtype: torch.dtype | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = super().forward(tokens)
        if self.out_dtype is not None and rows.dtype != self.out_dtype:
            rows = rows.to(self.out_dtype)
        return rows


def static_shape(*dims: int | torch.SymInt) -> list[int]:
    """``dims`` with the one dynamic (symbolic) size written as -1: XNNPACK delegates a reshape
    only if its shape is all integers with at most one inferred dim."""
    out = [d if isinstance(d, int) else -1 for d in dims]
    return out if out.count(-1) <= 1 else list(dims)


def mean_last(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(-1, keepdim=True)``, computed as the mean over the inner two dims of a 4-D view
    ``[1, rows, n, 1]``: the one form XNNPACK delegates (its global average pooling), so a norm
    does not split the delegate around a portable ``mean`` (the same sum in eager PyTorch)."""
    n = x.shape[-1]
    mean = x.reshape(1, -1, n, 1).mean((2, 3), keepdim=True)
    return mean.reshape(static_shape(*x.shape[:-1], 1))


def pair_swap() -> torch.Tensor:
    """The 2x2 weight mapping a rotary pair ``(x0, x1)`` to ``(-x1, x0)`` (``F.linear``)."""
    return torch.tensor([[0.0, -1.0], [1.0, 0.0]])


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


def rope_tables(args: ModelArgs, *, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables of shape ``[max_seq_len, rope_dim // 2]`` (Meta's convention),
    of the full-attention layers or (``local``) of the sliding ones (``rope_local_theta``,
    no scaling)."""
    half = args.rope_dim // 2
    theta = args.rope_local_theta if local and args.rope_local_theta else args.rope_theta
    # on the CPU whatever the default device (a meta-device model still gets real tables)
    freqs = 1.0 / (
        theta ** (torch.arange(0, half, dtype=torch.float64, device="cpu") * 2 / args.rope_dim)
    )
    if args.use_scaled_rope and not local:
        freqs = _llama3_scale_freqs(freqs, args)
    if args.rope_linear_factor != 1.0 and not local:
        freqs = freqs / args.rope_linear_factor
    positions = torch.arange(args.max_seq_len, dtype=torch.float64, device="cpu")
    angles = torch.outer(positions, freqs).numpy()
    # numpy, in this thread: torch's multi-threaded cos/sin gave tables 1 ulp apart between two
    # runs of one export (seen as a foundation.ptd with another sha256 when an adapter program
    # was added to an export), and the tables are foundation constants that must be reproducible
    return torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, swap: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of the first ``2 * cos.shape[-1]`` dims of each
    head (all of them unless the rotary embedding is partial); ``x`` is ``[b, seq, heads, d]``.
    ``swap`` is :func:`pair_swap` (a module's buffer, so that XNNPACK sees a constant weight)."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin, swap), x[..., rot:]], dim=-1)
    # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), with the pair swap (-x1, x0) as a 2x2
    # linear: unlike select/stack, every op is one XNNPACK delegates, so the rotary embedding
    # does not split a layer's delegate (exact: one non-zero product per output).
    b, _, heads, dim = x.shape
    pairs = static_shape(b, x.shape[1], heads, dim // 2, 2)
    xr = x.float().reshape(pairs)
    swap = pair_swap().to(x.device) if swap is None else swap.float()
    swapped = F.linear(xr.reshape(1, -1, 2), swap).reshape(pairs)
    out = xr * cos[None, :, None, :, None] + swapped * sin[None, :, None, :, None]
    return out.reshape(static_shape(b, x.shape[1], heads, dim)).type_as(x)


class KVCache(nn.Module):
    """Static ``[1, heads, max_seq_len, k_dim]`` / ``[..., v_dim]`` caches written in place at
    ``input_pos``."""

    def __init__(self, heads: int, max_seq_len: int, k_dim: int, v_dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, max_seq_len, k_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, max_seq_len, v_dim), persistent=False)

    def update(
        self, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = k.size(2)
        self.k_cache.narrow(2, start, seq).copy_(k)
        self.v_cache.narrow(2, start, seq).copy_(v)
        return self.k_cache, self.v_cache


def require_custom_ops() -> None:
    """Register ExecuTorch's LLM custom ops (``llama::custom_sdpa``, ``llama::update_cache``) in
    this process; :class:`DependencyError` naming the module if they cannot be."""
    module = "executorch.extension.llm.custom_ops.custom_ops"
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except (ImportError, OSError) as e:
        raise DependencyError(
            f"--sdpa custom needs ExecuTorch's LLM custom ops, but import {module} failed "
            f"({type(e).__name__}: {e}); use --sdpa plain or reinstall executorch"
        ) from None
    if not (hasattr(torch.ops.llama, "custom_sdpa") and hasattr(torch.ops.llama, "update_cache")):
        raise DependencyError(
            f"--sdpa custom: {module} registered no llama::custom_sdpa / llama::update_cache; "
            "use --sdpa plain"
        )


class CustomKVCache(nn.Module):
    """KV cache in ExecuTorch's ``[1, max_seq_len, heads, dim]`` layout, written in place by the
    ``llama::update_cache`` kernel (no functional copy of the whole cache per step), read by
    ``llama::custom_sdpa``."""

    def __init__(self, heads: int, max_seq_len: int, k_dim: int, v_dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, max_seq_len, heads, k_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, max_seq_len, heads, v_dim), persistent=False)

    def _apply(self, fn, recurse=True):
        # The kernels take an fp32 cache whatever the model's dtype (as ExecuTorch's example:
        # an fp16 model runs its attention in fp32), so model.to(fp16) leaves it fp32.
        super()._apply(fn, recurse)
        for name in ("k_cache", "v_cache"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``/``v`` are ``[1, seq, heads, dim]``."""
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        return self.k_cache, self.v_cache
