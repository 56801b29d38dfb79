"""Fused Q/K/V and gate/up projections, with LoRA adapters packed onto them by name.

Tolerance: fp32 outputs of fused vs split within 1e-5 absolute. The math is identical; a fused
matmul sums each row in the same order but BLAS may block a wider matrix differently, and the
packed adapter applies its scale before B instead of after (measured <= 5e-7 here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgelora.errors import AdapterError
from edgelora.lora.attach import attach_adapter, detach_adapters, merge_adapter
from edgelora.lora.fusion import (
    fuse_gate_up_projections,
    fuse_qkv_projections,
    restore_checkpoint_fusion_state,
    unfuse_gate_up_projections,
    unfuse_qkv_projections,
)
from edgelora.lora.modules import LoRALinear, LoRAPiece, PackedLoRALinear
from edgelora.lora.record import Adapter, LoRAWeights
from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusedLinear
from edgelora.models.llama import build_model
from edgelora.quant.linear import quantize_linears
from edgelora.weights.checkpoint import load_checkpoint
from edgelora.weights.synthetic import random_adapter

from ..tiny import TINY_2L

ATOL = 1e-5
ARGS = ModelArgs.from_dict(TINY_2L)
TOKENS, POS = torch.tensor([[1, 7, 3, 9, 22, 5]]), torch.tensor([0])


def run(model):
    model.reset_cache()
    with torch.no_grad():
        return model(TOKENS, POS)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def _exported_ops(module: nn.Module, x: torch.Tensor) -> list[str]:
    seq = torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(module, (x,), dynamic_shapes=({0: seq},))
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_packed_adapter_covering_every_slice_slices_no_activation():
    """With every slice adapted, the delta is one cat added to the fused output: the exported
    graph has no slice/split of activations (XNNPACK delegates none under a dynamic sequence
    length, so each would split the partition and run outside it). It matches the per-slice
    reference; with a slice left out, the fused output is split and that slice passes through."""
    torch.manual_seed(0)
    fused = FusedLinear(16, {"q": 32, "k": 8, "v": 8})
    pieces = [
        LoRAPiece(("q",), torch.randn(4, 16), torch.randn(32, 4), alpha=8.0),
        LoRAPiece(("k", "v"), torch.randn(2, 16), torch.randn(16, 2), alpha=2.0),
    ]
    packed = PackedLoRALinear(fused, pieces, module="wqkv")
    x = torch.randn(6, 16)
    base = fused(x)
    want = torch.cat(
        [
            base[:, :32] + pieces[0].scale * x @ pieces[0].lora_a.T @ pieces[0].lora_b.T,
            base[:, 32:] + pieces[1].scale * x @ pieces[1].lora_a.T @ pieces[1].lora_b.T,
        ],
        -1,
    )
    torch.testing.assert_close(packed(x), want, atol=ATOL, rtol=0)
    ops = _exported_ops(packed, x)
    assert not [o for o in ops if "slice" in o or "split" in o], ops
    assert sum("linear" in o for o in ops) == 1 + 2 + 3  # fused base, two A, three B
    partial = PackedLoRALinear(fused, pieces[:1], module="wqkv")
    y = partial(x)
    torch.testing.assert_close(y[:, :32], want[:, :32], atol=ATOL, rtol=0)
    torch.testing.assert_close(y[:, 32:], base[:, 32:], atol=0, rtol=0)
    assert any("split" in o or "slice" in o for o in _exported_ops(partial, x))


def test_fused_linear_maps_pieces_by_name_not_by_size():
    """output_sizes {a: 128, b: 128, c: 256}: a 256-row piece could be 'a+b' or 'c' by size;
    the declared slices decide, and each piece lands in its own rows."""
    torch.manual_seed(0)
    fused = FusedLinear(16, {"a": 128, "b": 128, "c": 256})
    ab = LoRAPiece(("a", "b"), torch.randn(2, 16), torch.randn(256, 2), alpha=4.0)
    c = LoRAPiece(("c",), torch.randn(3, 16), torch.randn(256, 3), alpha=3.0, use_rslora=True)
    x = torch.randn(5, 16)
    for pieces in ([ab, c], [c, ab]):
        packed = PackedLoRALinear(fused, pieces, module="m")
        y = packed(x)
        base = fused(x)
        want_ab = base[:, :256] + ab.scale * x @ ab.lora_a.T @ ab.lora_b.T
        want_c = base[:, 256:] + c.scale * x @ c.lora_a.T @ c.lora_b.T
        torch.testing.assert_close(y, torch.cat([want_ab, want_c], -1), atol=ATOL, rtol=0)
        got = {p.slices: p for p in packed.pieces()}  # unpacks bit for bit
        for p in (ab, c):
            assert torch.equal(got[p.slices].lora_a, p.lora_a)
            assert torch.equal(got[p.slices].lora_b, p.lora_b)
            assert got[p.slices].scale == p.scale
        # Only the pieces' own numbers are stored: no zero blocks of a block-structured B.
        stored = sum(t.numel() for n, t in packed.named_parameters() if "lora_" in n)
        assert stored == sum(p.lora_a.numel() + p.lora_b.numel() for p in pieces)
    only_c = PackedLoRALinear(fused, [c], module="m")  # a and b have no adapter: contribute 0
    torch.testing.assert_close(only_c(x)[:, :256], fused(x)[:, :256], atol=0, rtol=0)


@pytest.mark.parametrize(
    "pieces, match",
    [
        (
            [(("a", "b"), 200)],
            r"m: LoRA piece 0 for slices \['a', 'b'\] \(sizes \[128, 128\], sum 256",
        ),
        ([(("d",), 128)], r"m: LoRA piece 0 covers slices \['d'\]; unknown \['d'\]"),
        ([(("a",), 128), (("a", "b"), 256)], r"m: slice 'a' is covered by LoRA pieces 0 and 1"),
        ([((), 128)], r"m: LoRA piece 0 covers slices \[\]"),
    ],
)
def test_layout_errors_name_module_sizes_and_slices(pieces, match):
    fused = FusedLinear(16, {"a": 128, "b": 128, "c": 256})
    lora = [LoRAPiece(s, torch.zeros(2, 16), torch.zeros(rows, 2), 2.0) for s, rows in pieces]
    with pytest.raises(ValueError, match=match):
        PackedLoRALinear(fused, lora, module="m")


def test_fuse_unfuse_memory_storage_and_idempotence():
    model = build_model(ARGS)
    ref, params = run(model), n_params(model)
    attn = model.layers[0].attention
    wq_storage = attn.wq.weight.data_ptr()

    fuse_qkv_projections(model, inplace=False)  # both kept: unfuse gives back the same storage
    fuse_gate_up_projections(model, inplace=False)
    assert attn.is_fused and hasattr(attn, "wq") and hasattr(attn, "wqkv")
    torch.testing.assert_close(run(model), ref, atol=ATOL, rtol=0)
    fused_obj = attn.wqkv
    fuse_qkv_projections(model)  # idempotent
    assert attn.wqkv is fused_obj
    unfuse_qkv_projections(model)
    unfuse_gate_up_projections(model)
    unfuse_qkv_projections(model)  # idempotent
    assert not hasattr(attn, "wqkv") and attn.wq.weight.data_ptr() == wq_storage
    assert n_params(model) == params

    fuse_qkv_projections(model, inplace=True)
    fuse_gate_up_projections(model, inplace=True)
    for layer in model.layers:
        for gone in ("wq", "wk", "wv"):
            assert not hasattr(layer.attention, gone)
        assert not hasattr(layer.feed_forward, "w1") and not hasattr(layer.feed_forward, "w3")
        assert layer.attention.wqkv.output_sizes == {"wq": 64, "wk": 32, "wv": 32}  # GQA
    assert n_params(model) == params  # the split weights are gone, not duplicated
    assert all(p.data_ptr() != wq_storage for p in model.parameters())
    torch.testing.assert_close(run(model), ref, atol=ATOL, rtol=0)
    unfuse_qkv_projections(model)
    unfuse_gate_up_projections(model)
    assert isinstance(attn.wq, nn.Linear) and not hasattr(attn, "wqkv")
    torch.testing.assert_close(run(model), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("order", ["attach_then_fuse", "fuse_then_attach"])
def test_per_slice_adapters_survive_fusion(order):
    model = build_model(ARGS)
    adapter = random_adapter(model, "a", rank=4, alpha=8, seed=1)
    adapter.modules["layers.1.attention.wk"] = LoRAWeights(
        torch.randn(6, 64) * 0.1, torch.randn(32, 6) * 0.1, alpha=3.0, use_rslora=True
    )  # its own rank and scale
    adapter.scale = 0.7
    base = run(model)
    attach_adapter(model, adapter)
    ref = run(model)
    assert (ref - base).abs().max() > 1e-2
    if order == "fuse_then_attach":
        detach_adapters(model)
        fuse_qkv_projections(model, inplace=True)
        fuse_gate_up_projections(model, inplace=True)
        attach_adapter(model, adapter)
    else:
        fuse_qkv_projections(model, inplace=True)
        fuse_gate_up_projections(model, inplace=True)
    packed = model.layers[1].attention.wqkv
    assert isinstance(packed, PackedLoRALinear)
    assert [(s, r) for s, r, *_ in packed.layout] == [(("wq",), 4), (("wk",), 6), (("wv",), 4)]
    torch.testing.assert_close(run(model), ref, atol=ATOL, rtol=0)

    unfuse_qkv_projections(model)  # the packed adapters come back per slice, exactly
    unfuse_gate_up_projections(model)
    for fqn, w in adapter.modules.items():
        wrapped = model.get_submodule(fqn)
        assert isinstance(wrapped, LoRALinear), fqn
        assert torch.equal(wrapped.lora_a.weight, w.lora_a) and torch.equal(
            wrapped.lora_b.weight, w.lora_b
        )
    torch.testing.assert_close(run(model), ref, atol=ATOL, rtol=0)


def _fused_layout_adapter(seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(rank, rows, cols=64, alpha=8.0):
        return LoRAWeights(
            torch.randn(rank, cols, generator=g) * 0.1,
            torch.randn(rows, rank, generator=g) * 0.1,
            alpha,
        )

    return Adapter(
        "native",
        {
            "layers.0.attention.wqkv": w(4, 128),  # one lora_B spanning q+k+v
            "layers.0.feed_forward.w13": w(4, 2 * 192),
            "layers.1.attention.wq": w(2, 64),  # M=2 pieces onto N=3 slices
            "layers.1.attention.wkv": w(3, 64),
        },
    )


def test_fused_layout_adapter_on_split_and_fused_models():
    adapter = _fused_layout_adapter()
    model = build_model(ARGS)
    x = torch.randn(3, 64)
    attach_adapter(model, adapter)  # split model: the pieces are sliced by output_sizes
    attn = model.layers[0].attention
    piece = adapter.modules["layers.0.attention.wqkv"]
    for name, rows in (("wq", slice(0, 64)), ("wk", slice(64, 96)), ("wv", slice(96, 128))):
        wrapped = attn.get_submodule(name)
        want = wrapped.linear(x) + 2.0 * x @ piece.lora_a.T @ piece.lora_b[rows].T
        torch.testing.assert_close(wrapped(x), want, atol=ATOL, rtol=0)
    assert isinstance(model.layers[1].attention.wk, LoRALinear)
    split_out = run(model)
    detach_adapters(model)
    fuse_qkv_projections(model, inplace=True)
    fuse_gate_up_projections(model, inplace=True)
    attach_adapter(model, adapter)  # fused model: packed, each piece in its declared rows
    layout = [(s, r) for s, r, *_ in model.layers[1].attention.wqkv.layout]
    assert layout == [(("wq",), 2), (("wk", "wv"), 3)]
    torch.testing.assert_close(run(model), split_out, atol=ATOL, rtol=0)
    merged_ref = run(model)
    detach_adapters(model)
    merge_adapter(model, adapter)
    torch.testing.assert_close(run(model), merged_ref, atol=ATOL, rtol=0)


def test_conflicting_and_misfit_adapters_are_errors():
    model = build_model(ARGS)
    g = torch.randn
    both = Adapter(
        "both",
        {
            "layers.0.attention.wqkv": LoRAWeights(g(2, 64), g(128, 2), 4.0),
            "layers.0.attention.wk": LoRAWeights(g(2, 64), g(32, 2), 4.0),
        },
    )
    for fuse in (False, True):
        if fuse:
            fuse_qkv_projections(model, inplace=True)
        with pytest.raises(
            ValueError, match=r"layers.0.attention: slice 'wk' is covered by LoRA pieces"
        ):
            attach_adapter(model, both)
        assert not any(isinstance(m, (LoRALinear, PackedLoRALinear)) for m in model.modules())
    wrong = Adapter("w", {"layers.0.attention.wkv": LoRAWeights(g(2, 64), g(32, 2), 4.0)})
    with pytest.raises(AdapterError, match=r"slices \['wk', 'wv'\] \(sizes \[32, 32\], sum 64"):
        attach_adapter(model, wrong)


def test_restore_checkpoint_fusion_state_from_fused_and_split_checkpoints(tmp_path):
    src = build_model(ARGS, seed=3)
    split_sd = {k: v.clone() for k, v in src.state_dict().items()}
    fuse_qkv_projections(src, inplace=True)  # a natively fused checkpoint (qkv only)
    fused_sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert (
        "layers.0.attention.wqkv.weight" in fused_sd
        and "layers.0.feed_forward.w1.weight" in fused_sd
    )
    torch.save(fused_sd, tmp_path / "fused.pth")
    torch.save(split_sd, tmp_path / "split.pth")

    model = load_checkpoint(build_model(ARGS, seed=9), tmp_path / "fused.pth")
    ref = run(model)
    unfuse_qkv_projections(model)
    fuse_gate_up_projections(model, inplace=True)
    restore_checkpoint_fusion_state(model)
    for i, layer in enumerate(model.layers):
        assert layer.attention.is_fused and not hasattr(layer.attention, "wq")
        want = fused_sd[f"layers.{i}.attention.wqkv.weight"]
        assert torch.equal(layer.attention.wqkv.weight, want)  # the fused weights, not a flag
        assert not layer.feed_forward.is_fused and hasattr(layer.feed_forward, "w1")
    torch.testing.assert_close(run(model), ref, atol=ATOL, rtol=0)

    model = load_checkpoint(build_model(ARGS, seed=9), tmp_path / "split.pth")
    fuse_qkv_projections(model, inplace=True)
    restore_checkpoint_fusion_state(model)
    assert not model.layers[0].attention.is_fused
    assert torch.equal(
        model.layers[0].attention.wk.weight, split_sd["layers.0.attention.wk.weight"]
    )


def test_fused_layers_are_quantized_and_adapters_are_not():
    model = build_model(ARGS)
    fuse_qkv_projections(model, inplace=True)
    fuse_gate_up_projections(model, inplace=True)
    attach_adapter(model, random_adapter(build_model(ARGS), "a", rank=4, seed=2))
    report = quantize_linears(model, "8da4w", 32)
    quantized = {d.fqn for d in report.quantized}
    assert "layers.0.attention.wqkv.linear" in quantized
    assert "layers.0.feed_forward.w13.linear" in quantized
    assert not any("lora" in f for f in quantized)
    assert {d.reason for d in report.kept_float} == {"LoRA adapter matrix"}


def test_fold_scale_keeps_the_output_and_drops_the_multiplies():
    """``fold_scale()`` (a program's attached copy: the scale moved into lora_B) gives the same
    output as before, split and packed, and the exported graph has no multiply left (one per
    projection or piece before)."""
    torch.manual_seed(0)
    fused = FusedLinear(16, {"q": 32, "k": 8, "v": 8})
    pieces = [
        LoRAPiece(("q",), torch.randn(4, 16), torch.randn(32, 4), alpha=8.0),
        LoRAPiece(("k", "v"), torch.randn(2, 16), torch.randn(16, 2), alpha=2.0, use_rslora=True),
    ]
    split = LoRALinear.from_base(
        nn.Linear(16, 24, bias=False), LoRAWeights(torch.randn(4, 16), torch.randn(24, 4), 3.0)
    )
    x = torch.randn(6, 16)
    for wrapper in (PackedLoRALinear(fused, pieces, module="wqkv"), split):
        with torch.no_grad():
            want = wrapper(x)
        assert any("mul" in o for o in _exported_ops(wrapper, x))
        wrapper.fold_scale()
        with torch.no_grad():
            # one fp32 rounding of each B entry times its scale, summed over the rank
            torch.testing.assert_close(wrapper(x), want, atol=1e-5, rtol=1e-5)
        assert not [o for o in _exported_ops(wrapper, x) if "mul" in o]
