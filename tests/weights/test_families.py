"""The Hugging Face families, eager: a tiny random model made with transformers (biases and
norm weights randomised, so a dropped one shows) and a PEFT adapter on the family's usual
targets; our model loaded from the directory reproduces transformers' logits, and transformers
+ PEFT's with the adapter attached (fused or split).

Tolerance 1e-5 absolute on O(1) fp32 logits: the implementations differ only in summation
order and in computing rotary tables in fp64 (~2e-7 here).
"""

from __future__ import annotations

import copy

import pytest

from edgelora.lora.attach import attach_adapter, detach_adapters, merge_adapter
from edgelora.lora.fusion import restore_checkpoint_fusion_state, set_fusion
from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model
from edgelora.weights.adapter_files import load_adapter
from edgelora.weights.checkpoint import load_checkpoint, open_checkpoint

from ..hf_fixtures import ATOL, FAMILIES, hf_logits, make_family, our_logits, peft_adapter


def _ours(path):
    ckpt = open_checkpoint(path)
    args = ModelArgs.from_dict(ckpt.params)
    return load_checkpoint(build_model(args, seed=5), ckpt), args, ckpt


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = make_family(name, seed=1)
    hf.save_pretrained(root / "model")
    peft_model = peft_adapter(hf, root / "lora", seed=2, r=4, lora_alpha=8, **FAMILIES[name].lora)
    return name, root, hf_logits(hf), hf_logits(peft_model), peft_model


def test_eager_logits_match_transformers(family):
    name, root, ref, _, _ = family
    ours, args, ckpt = _ours(root / "model")
    diff = (our_logits(ours) - ref).abs().max().item()
    assert diff < ATOL, (name, diff)
    FAMILIES[name].check_args(args)
    # Phi-3's checkpoint is natively fused: loaded split, each block remembers it, and
    # restore_checkpoint_fusion_state() puts the fused qkv/gate_up rows back.
    fused = name == "phi3"
    assert all(b.attention.checkpoint_fused == fused for b in ours.layers)
    restore_checkpoint_fusion_state(ours)
    assert all(
        b.attention.is_fused == fused and b.feed_forward.is_fused == fused for b in ours.layers
    )
    assert (our_logits(ours) - ref).abs().max().item() < ATOL


@pytest.mark.parametrize("fuse", ["none", "all"])
def test_peft_adapter_matches_peft(family, fuse):
    name, root, base, ref, _ = family
    ours, args, _ = _ours(root / "model")
    adapter = load_adapter(root / "lora", args)
    set_fusion(ours, fuse)
    attach_adapter(ours, adapter)
    assert (ref - base).abs().max() > 1e-2  # the adapter matters
    diff = (our_logits(ours) - ref).abs().max().item()
    assert diff < ATOL, (name, fuse, diff)
    detach_adapters(ours)
    assert (our_logits(ours) - base).abs().max().item() < ATOL


def test_merged_adapter_matches_peft_merge(family):
    name, root, _, _, peft_model = family
    ours, args, _ = _ours(root / "model")
    merge_adapter(ours, load_adapter(root / "lora", args))
    ref = hf_logits(copy.deepcopy(peft_model).merge_and_unload())
    diff = (our_logits(ours) - ref).abs().max().item()
    assert diff < ATOL, (name, diff)


@pytest.mark.parametrize(
    "name, targets",
    [(n, None) for n in ("llama-bias", "mistral", "qwen2", "qwen3", "gemma3")]
    + [("phi3", ["qkv_proj"])],
)
def test_peft_default_targets_load(name, targets, tmp_path):
    """A LoraConfig without target_modules takes PEFT's default for the family (this PEFT
    has none for Phi-3, SmolLM3 and Granite; Phi-3 users target qkv_proj, a piece spanning q,
    k and v);
    it loads and matches PEFT."""
    hf = make_family(name, seed=3)
    hf.save_pretrained(tmp_path / "model")
    kw = {} if targets is None else {"target_modules": targets}
    peft_model = peft_adapter(hf, tmp_path / "lora", seed=4, r=4, lora_alpha=8, **kw)
    ours, args, _ = _ours(tmp_path / "model")
    attach_adapter(ours, load_adapter(tmp_path / "lora", args))
    diff = (our_logits(ours) - hf_logits(peft_model)).abs().max().item()
    assert diff < ATOL, (name, diff)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "export its text model"),
        ({"architectures": ["Qwen3MoeForCausalLM"]}, "mixture-of-experts"),
        (
            {"architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": 50.0},
            "attn_logit_softcapping=50.0 is not supported",
        ),
        (
            {"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope"}},
            "rope scaling type 'longrope' is not supported",
        ),
        ({"architectures": ["Qwen2ForCausalLM"], "hidden_act": "relu"}, "hidden_act 'relu'"),
    ],
)
def test_refused_configs_name_the_field(config, message):
    from edgelora.errors import ConfigError
    from edgelora.weights.architectures import args_from_hf_config

    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    with pytest.raises(ConfigError, match=message):
        args_from_hf_config({**base, **config}, "config.json")


def test_sliding_layers_from_each_config_style():
    from edgelora.weights.architectures import args_from_hf_config

    base = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=128)
    gemma_old = {"architectures": ["Gemma3ForCausalLM"], "sliding_window": 8}
    gemma_old["sliding_window_pattern"] = 2
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 8}
    qwen2 |= {"use_sliding_window": True, "max_window_layers": 3}
    mistral = {"architectures": ["MistralForCausalLM"], "sliding_window": 8}
    qwen3_off = {"architectures": ["Qwen3ForCausalLM"], "sliding_window": 8}
    qwen3_off |= {"use_sliding_window": False, "layer_types": ["sliding_attention"] * 4}
    want = {
        "gemma_old": ("sliding", "full", "sliding", "full"),
        "qwen2": ("full", "full", "full", "sliding"),
        "mistral": ("sliding",) * 4,
        "qwen3_off": None,
    }
    for name, cfg in dict(
        gemma_old=gemma_old, qwen2=qwen2, mistral=mistral, qwen3_off=qwen3_off
    ).items():
        fields = args_from_hf_config({**base, **cfg}, "config.json")
        assert fields.get("layer_types") == want[name], name
