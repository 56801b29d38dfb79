"""Adapter slots (``edgelora.lora.slots``) in eager PyTorch: a model with the adapter's
tensors passed as inputs computes what the model with the adapter attached computes.

Tolerance 1e-5 absolute on fp32 logits of magnitude ~1: the same products summed in another
order (bmm of x@A then @B with the scale folded into B, against linear/linear/scale).
"""

from __future__ import annotations

import pytest
import torch

from edgelora.errors import AdapterError
from edgelora.lora.attach import adapter_attached
from edgelora.lora.fusion import fuse_gate_up_projections, fuse_qkv_projections
from edgelora.lora.slots import adapter_slots, adapter_tensors, switchable
from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model
from edgelora.weights.synthetic import random_adapter

from ..tiny import TINY_2L

ARGS = TINY_2L
TOKENS = torch.tensor([[1, 7, 3, 9, 4]])


def _logits(model, program=None, lora=()):
    model.reset_cache()
    with torch.no_grad():
        return (program or model)(TOKENS, torch.tensor([0]), *lora)


@pytest.mark.parametrize("fuse", [False, True])
def test_inputs_equal_attached_adapter(fuse):
    model = build_model(ModelArgs.from_dict(ARGS), seed=3)
    wide = random_adapter(model, "wide", rank=4, seed=1)
    qv = random_adapter(model, "qv", rank=8, targets=("q_proj", "v_proj"), seed=2)
    for w in qv.modules.values():
        w.use_rslora = True
    qv.scale = 0.5
    if fuse:  # adapters on wq/wk/wv are packed onto wqkv; the slots are the fused layers
        fuse_qkv_projections(model, inplace=True)
        fuse_gate_up_projections(model, inplace=True)
    slots = adapter_slots(model, [wide, qv])
    names = {s.module.split(".", 2)[2]: s.rank for s in slots if s.module.startswith("layers.0")}
    if fuse:  # packed ranks add up on the fused layer: wide 4 (q, k, v) = 12; qv 8 + 8 = 16
        assert names == {
            "attention.wqkv": 16,
            "attention.wo": 4,
            "feed_forward.w13": 8,
            "feed_forward.w2": 4,
        }
    else:
        assert names["attention.wq"] == 8 and names["attention.wk"] == 4
    for adapter in (wide, qv, None):
        with adapter_attached(model, adapter):
            want = _logits(model)
        tensors = adapter_tensors(model, adapter, slots)
        with switchable(model, slots) as program:
            got = _logits(model, program, [tensors])
        assert (got - want).abs().max().item() < 1e-5
    assert (_logits(model) - want).abs().max().item() == 0  # slots removed again
    want_n = 2 * len(slots)
    with switchable(model, slots) as program, pytest.raises(ValueError, match=f"{want_n} lora"):
        _logits(model, program, [tensors[:-1]])


def test_adapter_must_fit_slots():
    model = build_model(ModelArgs.from_dict(ARGS), seed=3)
    small = random_adapter(model, "small", rank=2, targets=("q_proj",), seed=1)
    big = random_adapter(model, "big", rank=4, targets=("q_proj",), seed=2)
    other = random_adapter(model, "other", rank=2, targets=("q_proj", "o_proj"), seed=2)
    slots = adapter_slots(model, [small])
    with pytest.raises(AdapterError, match=r"layers.0.attention.wq \(rank 4\).*slot rank 2"):
        adapter_tensors(model, big, slots)
    with pytest.raises(AdapterError, match=r"layers.0.attention.wo \(rank 2\).*no slot"):
        adapter_tensors(model, other, slots)
    with pytest.raises(TypeError):  # the model itself has one signature: no lora inputs
        _logits(model, lora=[[]])


@pytest.mark.parametrize(
    "dtype, bound",
    # fp16 rounds each adapter weight to 11 bits (relative 2^-11), int8 to 1/254 of its rank
    # component's largest value; the LoRA delta here is ~0.3 of logits of magnitude ~1, so the
    # logits move by at most those fractions of it (measured: fp16 ~1e-4, int8 ~3e-3)
    [(torch.float16, 1e-3), (torch.int8, 1e-2)],
)
def test_narrow_adapter_inputs(dtype, bound, tmp_path):
    """fp16 and int8 inputs: smaller files (about 1/2 and 1/4 of fp32 plus the safetensors
    header and int8 scales), logits within the bound of the fp32 inputs', and the base (zero
    inputs) exactly the base."""
    from edgelora.format.adapter_inputs import (
        load_adapter_tensors,
        save_adapter_tensors,
        zero_inputs,
    )

    model = build_model(ModelArgs.from_dict(ARGS), seed=3)
    wide = random_adapter(model, "wide", rank=8, seed=1)
    slots = adapter_slots(model, [wide])
    fp32 = adapter_tensors(model, wide, slots)
    with switchable(model, slots) as program:
        want = _logits(model, program, [fp32])
        base = _logits(model, program, [zero_inputs(slots)])
    files = {}
    for dt in (torch.float32, dtype):
        files[dt] = tmp_path / f"{dt}.safetensors"
        save_adapter_tensors(files[dt], adapter_tensors(model, wide, slots, dt), slots, dt)
    narrow = load_adapter_tensors(files[dtype], slots, dtype)
    with switchable(model, slots, dtype) as program:
        got = _logits(model, program, [narrow])
        assert torch.equal(_logits(model, program, [zero_inputs(slots, dtype)]), base)
    err = (got - want).abs().max().item()
    assert 0 < err < bound, err
    values = sum(s.in_features * s.rank + s.rank * s.out_features for s in slots)
    size, fp32 = files[dtype].stat().st_size, files[torch.float32].stat().st_size
    assert size < fp32 * (0.6 if dtype == torch.float16 else 0.4)
    assert size <= values * dtype.itemsize + 64 * 1024  # the values, + header and scales
    with pytest.raises(AdapterError, match="program takes"):  # a file of another dtype
        load_adapter_tensors(files[torch.float32], slots, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_adapter_file_holds_its_own_parameters_whatever_the_slots(dtype, tmp_path):
    """A rank-4 adapter on q/v stored for slots reserving rank 16 on every projection: the file
    holds its own parameters (+ header and scales, <= 64 KiB), not the slots' room, and reads
    back as exactly the padded inputs. A file written padded (before files were compact) reads
    back the same."""
    from safetensors.torch import save_file

    from edgelora.format.adapter_inputs import (
        Slot,
        load_adapter_tensors,
        save_adapter_tensors,
        tensor_names,
    )

    model = build_model(ModelArgs.from_dict(ARGS), seed=3)
    room = random_adapter(model, "room", rank=16, seed=1)
    qv = random_adapter(model, "qv", rank=4, targets=("q_proj", "v_proj"), seed=2)
    slots = adapter_slots(model, [room, qv])
    want = adapter_tensors(model, qv, slots, dtype)
    path = tmp_path / "qv.safetensors"
    save_adapter_tensors(path, want, slots, dtype)
    got = load_adapter_tensors(path, slots, dtype)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    own = sum(w.lora_a.numel() + w.lora_b.numel() for w in qv.modules.values())
    room_values = sum(s.in_features * s.rank + s.rank * s.out_features for s in slots)
    assert path.stat().st_size <= own * dtype.itemsize + 64 * 1024
    assert own * 8 < room_values  # so a padded file would be far larger
    padded = tmp_path / "padded.safetensors"
    save_file(dict(zip(tensor_names(slots, dtype), want, strict=True)), str(padded))
    back = load_adapter_tensors(padded, slots, dtype)
    assert all(torch.equal(g, w) for g, w in zip(back, want, strict=True))
    assert slots[0].module.endswith("wq")  # qv's rank 4 does not fit a rank-2 slot there
    narrow = [Slot(slots[0].module, slots[0].in_features, slots[0].out_features, 2), *slots[1:]]
    with pytest.raises(AdapterError, match="rank at most 2"):
        load_adapter_tensors(path, narrow, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_stored_inputs_converted_at_switch_equal_the_in_program_conversion(dtype):
    """An export's program takes fp32 inputs and a process converts the stored fp16/int8
    tensors once per switch (``program_inputs``): the logits equal (bit for bit: the same
    cast and product) those of a program that converts them itself on every call."""
    from edgelora.format.adapter_inputs import program_inputs

    model = build_model(ModelArgs.from_dict(ARGS), seed=3)
    wide = random_adapter(model, "wide", rank=8, seed=1)
    slots = adapter_slots(model, [wide])
    stored = adapter_tensors(model, wide, slots, dtype)
    with switchable(model, slots, dtype) as program:
        want = _logits(model, program, [stored])
    converted = program_inputs(stored, slots, dtype, torch.float32)
    assert [t.dtype for t in converted] == [torch.float32] * (2 * len(slots))
    with switchable(model, slots) as program:
        assert torch.equal(_logits(model, program, [converted]), want)
    assert program_inputs(stored, slots, dtype, dtype) == stored  # nothing to convert


def test_int8_inputs_on_the_runtime(tmp_path):
    """An int8 switchable program lowered to XNNPACK runs its dequantization on the runtime
    and matches the eager program (1e-4: fp32 kernels reorder sums)."""
    from edgelora.backends.xnnpack.lower import lower_to_xnnpack
    from edgelora.export.programs import trace
    from edgelora.runtime.program import LlamaProgram

    args = ModelArgs.from_dict(ARGS)
    model = build_model(args, seed=3)
    wide = random_adapter(model, "wide", rank=8, seed=1)
    slots = adapter_slots(model, [wide])
    tensors = adapter_tensors(model, wide, slots, torch.int8)
    example = adapter_tensors(model, None, slots, torch.int8)
    with switchable(model, slots, torch.int8) as program:
        want = _logits(model, program, [tensors])[0]
        lowered = lower_to_xnnpack(
            trace(program, args, extra_inputs=example), is_adapter=lambda fqn: False
        )
    lowered.write_pte(tmp_path / "s.pte")
    lowered.write_data_files(tmp_path)
    # a bare lowered program: it carries no edgelora checksums
    rt = LlamaProgram(tmp_path / "s.pte", tmp_path / "foundation.ptd", allow_unverified=True)
    rt.extra_inputs = tensors
    got = rt.forward(TOKENS[0].tolist(), 0)
    assert (got - want).abs().max().item() < 1e-4
