"""The memory path of the foundation (meta-device build, checkpoint tensors assigned in their
own dtype from lazily mapped files, one part quantized at a time) gives bit-identical weights
and programs to the whole-model path it replaced: random fp32 model, checkpoint copied over it
(upcast), merge, fuse, cast and quantize the whole model at once."""

from __future__ import annotations

import pytest
import torch

from edgelora.backends.xnnpack.lower import lower_to_xnnpack
from edgelora.export.config import FoundationSpec
from edgelora.export.foundation import build_foundation
from edgelora.export.programs import trace
from edgelora.lora.attach import merge_adapter
from edgelora.lora.fusion import set_fusion
from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model
from edgelora.weights.adapter_files import load_adapter
from edgelora.weights.checkpoint import open_checkpoint
from edgelora.weights.tensor_files import read_state_dict

from ..hf_fixtures import ALL7, make_family, make_hf, peft_adapter


def _whole_model(args, spec, path, merge=None):
    """The path before the memory work, step by step on the whole model: torchao's quantize_
    on the whole model (every weight at once), as quant/ did it."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    from edgelora.weights.checkpoint import load_checkpoint

    def granularity(g):
        return PerAxis(0) if g == 0 else PerGroup(g)

    model = build_model(args, seed=spec.seed, sdpa=spec.sdpa, logits=spec.logits)
    load_checkpoint(model, path)
    if merge is not None:
        merge_adapter(model, merge)
    set_fusion(model, spec.fuse)
    if spec.torch_dtype != torch.float32:
        model.to(spec.torch_dtype)
    if spec.embedding_bits:
        bits = torch.int4 if spec.embedding_bits == 4 else torch.int8
        cfg = IntxWeightOnlyConfig(
            weight_dtype=bits, granularity=granularity(spec.embedding_group_size)
        )
        quantize_(model, cfg, filter_fn=lambda m, name: name == "tok_embeddings")
    if spec.qmode != "none":
        bits = torch.int4 if spec.qmode == "8da4w" else torch.int8
        cfg = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=bits, weight_granularity=granularity(spec.group_size)
        )
        quantize_(model, cfg, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear))
    narrow = open_checkpoint(path).dtype
    if not spec.embedding_bits and spec.torch_dtype == torch.float32 and narrow != torch.float32:
        # the float table back in the checkpoint's dtype (exact), rows cast after the lookup
        emb = model.tok_embeddings
        emb.weight = torch.nn.Parameter(emb.weight.detach().to(narrow), emb.weight.requires_grad)
        emb.out_dtype = torch.float32
    return model


def _parts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor's stored pieces (a torchao subclass: its qdata, scale, zero point, ...)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return {"": t.detach()}
    names, _ = t.__tensor_flatten__()
    return {n: getattr(t, n) for n in names}


def _assert_identical(a, b):
    sa = {**dict(a.named_buffers()), **a.state_dict()}
    sb = {**dict(b.named_buffers()), **b.state_dict()}
    assert sa.keys() == sb.keys()
    for key in sa:
        assert type(sa[key]) is type(sb[key]), key
        pa, pb = _parts(sa[key]), _parts(sb[key])
        assert pa.keys() == pb.keys(), key
        for n in pa:
            assert pa[n].dtype == pb[n].dtype and torch.equal(pa[n], pb[n]), (key, n)


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    hf = make_hf(seed=4, tie_word_embeddings=True)
    peft_adapter(hf, root / "ad", r=4, lora_alpha=8, target_modules=ALL7)
    hf.to(torch.bfloat16).save_pretrained(root / "llama")
    return root


SPECS = {
    # affine scales: HQQ's search (the presets' choice) is not bit-identical when the rows
    # are quantized a few at a time (its numerics differ by a rounding step on some values)
    "8da4w-emb4-fused-merged": dict(
        qmode="8da4w",
        group_size=32,
        qparams="affine",
        embedding_bits=4,
        embedding_group_size=32,
        fuse="all",
    ),  # fmt: skip
    "8da8w-perchannel-fp16": dict(qmode="8da8w", group_size=0, dtype="fp16", embedding_bits=8),
    "float": dict(qmode="none", fuse="qkv"),
}


@pytest.mark.parametrize("name", SPECS)
def test_memory_path_is_bit_identical(bf16_llama, name, monkeypatch):
    """Also with every weight quantized a few rows at a time (quant/rows.py)."""
    from edgelora.quant import rows

    monkeypatch.setattr(rows, "BLOCK_VALUES", 64 * 5)  # dim 64: 5 rows per block
    path = bf16_llama / "llama"
    spec = FoundationSpec.by_hand(checkpoint=path, **SPECS[name])
    ckpt = open_checkpoint(path)
    assert ckpt.dtype == torch.bfloat16
    args = ModelArgs.from_dict({**ckpt.params, "max_seq_len": 32})
    merge = load_adapter(bf16_llama / "ad", args, name="m") if "merged" in name else None
    new, report, _ = build_foundation(args, spec, checkpoint=ckpt, merge=merge)
    assert ckpt.state_dict == {}  # handed over to the model
    _assert_identical(new, _whole_model(args, spec, path, merge))
    assert len(report.decisions) == len(list(new.modules())) - len(
        [m for m in new.modules() if not isinstance(m, torch.nn.Linear)]
    )


def test_memory_path_phi3_natively_fused(tmp_path):
    hf = make_family("phi3", seed=2)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "phi3")
    path = tmp_path / "phi3"
    for fuse in ("none", "all"):
        spec = FoundationSpec.by_hand(
            checkpoint=path, qmode="8da4w", group_size=32, qparams="affine", fuse=fuse
        )
        args = ModelArgs.from_dict({**open_checkpoint(path).params, "max_seq_len": 32})
        new, _, _ = build_foundation(args, spec)
        _assert_identical(new, _whole_model(args, spec, path))


def test_memory_path_programs_are_byte_identical(bf16_llama, tmp_path):
    """One lowering of each: the .pte and foundation.ptd bytes agree."""
    path = bf16_llama / "llama"
    spec = FoundationSpec.by_hand(
        checkpoint=path, qmode="8da4w", group_size=32, qparams="affine", sdpa="custom"
    )
    args = ModelArgs.from_dict({**open_checkpoint(path).params, "max_seq_len": 32})
    files = []
    for i, model in enumerate((build_foundation(args, spec)[0], _whole_model(args, spec, path))):
        lowered = lower_to_xnnpack(trace(model, args), is_adapter=lambda fqn: False)
        out = tmp_path / str(i)
        out.mkdir()
        lowered.write_pte(out / "p.pte")
        lowered.write_data_files(out)
        files.append([f.read_bytes() for f in sorted(out.iterdir())])
    assert len(files[0]) == 2 and files[0] == files[1]


def test_float_embedding_keeps_the_checkpoint_dtype(bf16_llama):
    """A bf16 checkpoint's float embedding stays bf16 (half the bytes) and the logits are those
    of the table upcast to fp32 exactly: the cast after the lookup loses nothing."""
    path = bf16_llama / "llama"
    args = ModelArgs.from_dict({**open_checkpoint(path).params, "max_seq_len": 32})
    narrow, report, _ = build_foundation(
        args, FoundationSpec.by_hand(checkpoint=path, qmode="8da4w")
    )
    emb = narrow.tok_embeddings
    assert emb.weight.dtype == torch.bfloat16 and emb.out_dtype == torch.float32
    assert any("tok_embeddings: kept bfloat16" in n for n in report.notes)
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = narrow(tokens, torch.tensor([0]))
        narrow.reset_cache()
        emb.weight = torch.nn.Parameter(emb.weight.detach().float(), requires_grad=False)
        emb.out_dtype = None
        want = narrow(tokens, torch.tensor([0]))
    assert torch.equal(got, want)
    # a quantized embedding or an fp16 model is built from the fp32 upcast, as before
    spec = FoundationSpec.by_hand(checkpoint=path, qmode="8da4w", dtype="fp16")
    assert build_foundation(args, spec)[0].tok_embeddings.weight.dtype == torch.float16


def test_lazy_safetensors_reads_on_use(bf16_llama):
    """A lazily read tensor equals the eager read, in the file's dtype."""
    (f,) = (bf16_llama / "llama").glob("*.safetensors")
    lazy, eager = read_state_dict(f, lazy=True), read_state_dict(f)
    assert lazy.keys() == eager.keys()
    for k in eager:
        assert lazy[k].dtype == eager[k].dtype == torch.bfloat16
        assert torch.equal(lazy[k], eager[k])


def test_program_writer_refuses_a_different_foundation(tmp_path, tiny_args):
    """Later programs' foundations are compared by digest (from memory): a mismatch, or a
    lowering writing another data file, is an internal error naming both hashes."""
    from edgelora.errors import InternalError
    from edgelora.export.programs import ProgramWriter
    from edgelora.export.timing import StageTimer

    writer = ProgramWriter(tmp_path, tmp_path, tiny_args, StageTimer(lambda s: None))
    writer._check_foundation({"foundation.ptd": "ab" * 32}, "base", first=True)
    writer._check_foundation({"foundation.ptd": "ab" * 32}, "a", first=False)
    with pytest.raises(InternalError, match=r"foundation of 'b' \(sha256 cdcdcd.*abab"):
        writer._check_foundation({"foundation.ptd": "cd" * 32}, "b", first=False)
    with pytest.raises(InternalError, match="only foundation.ptd"):
        writer._check_foundation({"foundation.ptd": "ab" * 32, "x.ptd": "00"}, "c", first=False)
