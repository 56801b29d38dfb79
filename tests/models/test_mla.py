"""Multi-head latent attention: config validation, fused (``wq_kv_a``) vs split projections with
and without adapters, checkpoint conversion both ways, and Hugging Face DeepSeek-V3 + PEFT.

Tolerances: fused vs split fp32 within 1e-6 absolute (the same products, one matmul instead of
two: only summation order can differ; measured <= 6e-8); against transformers within
``hf_fixtures.ATOL`` = 1e-5 (float summation order and fp64 vs fp32 rope tables; measured
~1.6e-6).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from edgelora.errors import ConfigError
from edgelora.lora.attach import attach_adapter, detach_adapters
from edgelora.lora.fusion import fuse_mla_projections, fuse_qkv_projections, unfuse_mla_projections
from edgelora.lora.modules import PackedLoRALinear
from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusedLinear
from edgelora.models.llama import build_model
from edgelora.models.mla import cache_floats_per_token
from edgelora.weights.adapter_files import load_adapter
from edgelora.weights.checkpoint import load_checkpoint, open_checkpoint
from edgelora.weights.layout import mla_state_dict_to_fused, mla_state_dict_to_split
from edgelora.weights.synthetic import random_adapter, random_peft_adapter
from edgelora.weights.tensor_files import save_checkpoint

from ..hf_fixtures import ATOL, MLA_TARGETS, PROMPT, make_deepseek, our_logits, peft_adapter

FUSED_ATOL = 1e-6
MLA = ModelArgs(
    dim=64,
    n_layers=2,
    n_heads=4,
    vocab_size=128,
    hidden_dim=96,
    max_seq_len=32,
    attention_type="mla",
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
)


def logits(model, tokens=PROMPT):
    model.reset_cache()
    with torch.no_grad():
        return model(tokens, torch.tensor([0]))[0]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fused_mla_lora_proj": True}, "requires attention_type='mla'"),
        (
            {**dataclasses.asdict(MLA), "q_lora_rank": 0, "fused_mla_lora_proj": True},
            "q_lora_rank > 0",
        ),
        ({"q_lora_rank": 8}, "MLA field(s) set with attention_type='gqa'"),
        ({**dataclasses.asdict(MLA), "kv_lora_rank": 0}, "kv_lora_rank must be > 0"),
        ({**dataclasses.asdict(MLA), "qk_rope_head_dim": 7}, "must be even"),
        ({**dataclasses.asdict(MLA), "n_kv_heads": 2}, "MLA shares one latent"),
        ({**dataclasses.asdict(MLA), "attention_type": "mqa"}, "attention_type must be one of"),
        ({**dataclasses.asdict(MLA), "use_scaled_rope": True}, "not supported with"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelArgs(**fields)


def test_mla_args_skip_the_gqa_head_checks():
    args = dataclasses.replace(MLA, dim=66, n_heads=4)  # 66 % 4 != 0 is fine for MLA
    assert args.qk_head_dim == 20 and args.rope_dim == 8


def test_incremental_decode_equals_one_pass():
    for args in (MLA, dataclasses.replace(MLA, q_lora_rank=0)):
        model = build_model(args, seed=1)
        full = logits(model)
        model.reset_cache()
        with torch.no_grad():
            parts = [model(PROMPT[:, :4], torch.tensor([0]))]
            parts += [model(PROMPT[:, i : i + 1], torch.tensor([i])) for i in range(4, 10)]
        assert (torch.cat(parts, 1)[0] - full).abs().max() < FUSED_ATOL


def test_cache_holds_expanded_keys_and_values():
    model = build_model(MLA)
    cache = model.layers[0].attention.kv_cache
    per_token = cache.k_cache[0, :, 0].numel() + cache.v_cache[0, :, 0].numel()
    assert per_token == cache_floats_per_token(MLA)["expanded"] == 4 * (20 + 10)
    assert cache_floats_per_token(MLA)["latent"] == 16 + 8


def test_fused_config_builds_only_the_fused_layer_and_matches_split():
    split = build_model(MLA, seed=2)
    fused = build_model(dataclasses.replace(MLA, fused_mla_lora_proj=True), seed=2)
    attn = fused.layers[0].attention
    assert isinstance(attn.wq_kv_a, FusedLinear) and not hasattr(attn, "wq_a")
    assert attn.wq_kv_a.output_sizes == {"wq_a": 24, "wkv_a": 24}
    fused.load_state_dict(mla_state_dict_to_fused(split.state_dict(), MLA))
    assert (logits(fused) - logits(split)).abs().max() < FUSED_ATOL


@pytest.mark.parametrize("inplace", [False, True])
def test_fuse_with_adapter_attached_packs_it(inplace):
    model = build_model(MLA, seed=3)
    base = logits(model)
    adapter = random_adapter(model, "a", rank=4, alpha=8, seed=4)
    attach_adapter(model, adapter)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 0.01  # the adapter changes the output >> FUSED_ATOL
    split_weight = model.layers[0].attention.wq_a.linear.weight
    fuse_mla_projections(model, inplace=inplace)
    attn = model.layers[0].attention
    assert isinstance(attn.wq_kv_a, PackedLoRALinear)
    assert hasattr(attn, "wq_a") != inplace
    if inplace:  # the split base weights are gone, not just hidden
        names = [n for n, _ in model.named_parameters()]
        assert not any(".attention.wq_a." in n or ".attention.wkv_a." in n for n in names)
        assert all(p is not split_weight for p in model.parameters())
    assert (logits(model) - adapted).abs().max() < FUSED_ATOL
    unfuse_mla_projections(model)
    assert not hasattr(attn, "wq_kv_a")
    assert (logits(model) - adapted).abs().max() < FUSED_ATOL
    # The per-slice adapters come back exactly.
    for name in ("wq_a", "wkv_a"):
        got = getattr(attn, name)
        want = adapter.modules[f"layers.0.attention.{name}"]
        assert torch.equal(got.lora_a.weight, want.lora_a)
        assert torch.equal(got.lora_b.weight, want.lora_b)


def test_fused_layout_adapter_on_split_model():
    """One lora_B spanning wq_a + wkv_a (an adapter trained on wq_kv_a) is sliced by name."""
    model = build_model(MLA, seed=5)
    adapter = random_adapter(model, "f", rank=3, alpha=6, seed=6, targets=("attention.wq_a",))
    a = torch.randn(3, 64) * 0.1
    b = torch.randn(48, 3) * 0.1
    adapter.modules = {
        "layers.1.attention.wq_kv_a": type(adapter.modules["layers.0.attention.wq_a"])(a, b, 6.0)
    }
    attach_adapter(model, adapter)
    split_out = logits(model)
    attn = model.layers[1].attention
    assert torch.equal(attn.wq_a.lora_b.weight, b[:24]) and torch.equal(
        attn.wkv_a.lora_b.weight, b[24:]
    )
    detach_adapters(model)
    fuse_mla_projections(model, inplace=True)
    attach_adapter(model, adapter)
    assert (logits(model) - split_out).abs().max() < FUSED_ATOL


def test_mla_fusion_errors():
    no_q_latent = build_model(dataclasses.replace(MLA, q_lora_rank=0))
    with pytest.raises(ValueError, match="q_lora_rank is 0"):
        fuse_mla_projections(no_q_latent)
    with pytest.raises(ValueError, match="no wq/wk/wv"):
        fuse_qkv_projections(build_model(MLA))
    with pytest.raises(ValueError, match="attention_type='gqa'"):
        fuse_mla_projections(build_model(ModelArgs()))


def test_state_dict_conversion_round_trip_is_bit_exact():
    sd = build_model(MLA, seed=7).state_dict()
    fused = mla_state_dict_to_fused(sd, MLA)
    assert "layers.0.attention.wq_kv_a.weight" in fused
    assert not any(".wq_a." in k or ".wkv_a." in k for k in fused)
    back = mla_state_dict_to_split(fused, MLA)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert mla_state_dict_to_fused(fused, MLA).keys() == fused.keys()  # idempotent
    bad = dict(fused)
    bad["layers.0.attention.wq_kv_a.weight"] = bad["layers.0.attention.wq_kv_a.weight"][:40]
    with pytest.raises(ValueError, match=r"wq_kv_a.weight has 40 rows, expected 48"):
        mla_state_dict_to_split(bad, MLA)
    half = {k: v for k, v in sd.items() if "layers.1.attention.wkv_a" not in k}
    with pytest.raises(ValueError, match="layers.1.attention: has wq_a but no wkv_a"):
        mla_state_dict_to_fused(half, MLA)


@pytest.mark.parametrize("ckpt_fused, model_fused", [(False, True), (True, False)])
def test_checkpoint_in_either_layout_loads_either_way(tmp_path, ckpt_fused, model_fused):
    src = build_model(dataclasses.replace(MLA, fused_mla_lora_proj=ckpt_fused), seed=8)
    path = save_checkpoint(src, tmp_path / "mla.safetensors")
    dst = build_model(dataclasses.replace(MLA, fused_mla_lora_proj=model_fused), seed=9)
    ckpt = open_checkpoint(path)
    load_checkpoint(dst, ckpt)
    assert dst.layers[0].attention.is_fused == model_fused
    assert any("converted 2 layer(s)" in n for n in ckpt.notes), ckpt.notes
    assert (logits(dst) - logits(src)).abs().max() < FUSED_ATOL


# --- Hugging Face DeepSeek-V3 ------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    hf = make_deepseek()
    path = tmp_path_factory.mktemp("ds") / "deepseek"
    hf.save_pretrained(path)
    return hf, path


def ours_from(path, **overrides):
    ckpt = open_checkpoint(path)
    args = ModelArgs.from_dict({**ckpt.params, **overrides})
    return load_checkpoint(build_model(args, seed=11), ckpt), args


def test_deepseek_checkpoint_matches_transformers(deepseek_dir):
    hf, path = deepseek_dir
    ours, args = ours_from(path)
    assert args.is_mla and args.q_lora_rank == 24 and not ours.layers[0].attention.is_fused
    with torch.no_grad():
        ref = hf(PROMPT).logits[0]
    assert (our_logits(ours) - ref).abs().max() < ATOL
    fused, _ = ours_from(path, fused_mla_lora_proj=True)  # converted on load
    assert fused.layers[0].attention.is_fused
    assert (our_logits(fused) - ref).abs().max() < ATOL


def test_deepseek_without_query_latent(tmp_path):
    hf = make_deepseek(seed=1, q_lora_rank=None)
    hf.save_pretrained(tmp_path / "ds")
    ours, args = ours_from(tmp_path / "ds")
    assert args.q_lora_rank == 0 and hasattr(ours.layers[0].attention, "wq")
    with torch.no_grad():
        ref = hf(PROMPT).logits[0]
    assert (our_logits(ours) - ref).abs().max() < ATOL


def test_peft_adapter_on_deepseek(deepseek_dir, tmp_path):
    hf, path = deepseek_dir
    peft_model = peft_adapter(
        hf, tmp_path / "lora", seed=2, r=4, lora_alpha=8, target_modules=MLA_TARGETS
    )
    with torch.no_grad():
        ref = peft_model(PROMPT).logits[0]
        base = hf(PROMPT).logits[0]
    ours, args = ours_from(path)
    adapter = load_adapter(tmp_path / "lora", args)
    assert len(adapter.modules) == 2 * len(MLA_TARGETS)
    attach_adapter(ours, adapter)
    assert (ref - base).abs().max() > 0.1
    assert (our_logits(ours) - ref).abs().max() < ATOL
    fuse_mla_projections(ours, inplace=True)  # packed onto wq_kv_a
    assert isinstance(ours.layers[0].attention.wq_kv_a, PackedLoRALinear)
    assert (our_logits(ours) - ref).abs().max() < ATOL
    # Our PEFT writer round-trips MLA adapters (MLP projections too).
    full = random_adapter(build_model(args), "all", rank=2, alpha=4, seed=3)
    back = random_peft_adapter(
        build_model(args), tmp_path / "again", args, "all", rank=2, alpha=4, seed=3
    )
    assert back.modules.keys() == full.modules.keys()
    assert all(torch.equal(back.modules[k].lora_b, w.lora_b) for k, w in full.modules.items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"first_k_dense_replace": 1}, "first_k_dense_replace=1 < num_hidden_layers=2"),
        ({"rope_interleave": False}, "rope_interleave=false is not supported"),
        (
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 5000.0,
                    "original_max_position_embeddings": 16,
                }
            },
            "rope scaling",
        ),
    ],
)
def test_deepseek_unsupported_configs_name_the_field(tmp_path, overrides, message):
    path = tmp_path / "ds"
    path.mkdir()
    cfg = {
        **json.loads(
            json.dumps(dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"))
        ),
        **_cfg(),
        **overrides,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_checkpoint(build_model(MLA), path / "model.safetensors")
    with pytest.raises(ConfigError, match=message):
        open_checkpoint(path)


def _cfg():
    from ..hf_fixtures import DEEPSEEK_CONFIG

    return dict(DEEPSEEK_CONFIG)
