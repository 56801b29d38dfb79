"""Real formats against the real libraries: a tiny ``LlamaForCausalLM`` (transformers) and LoRA
adapters made by ``peft``, all created offline here, must give the same logits in our model.

Tolerance: fp32 logits within 1e-5 absolute (the logits are O(1); the two implementations differ
only in float summation order and in computing rope tables in fp64 vs fp32, which measures
~2e-7 here).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgelora.errors import AdapterError, CheckpointError, ConfigError
from edgelora.lora.attach import attach_adapter, detach_adapters, merge_adapter
from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model
from edgelora.weights.adapter_files import load_adapter
from edgelora.weights.checkpoint import load_checkpoint, open_checkpoint

from ..hf_fixtures import ALL7, ATOL, hf_logits, make_hf, our_logits, peft_adapter


@pytest.fixture(scope="module")
def hf_model():
    return make_hf()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    hf_model.save_pretrained(path)
    return path


def our_model(path, **overrides):
    ckpt = open_checkpoint(path)
    args = ModelArgs.from_dict({**ckpt.params, **overrides})
    return load_checkpoint(build_model(args, seed=123), ckpt), args


def test_hf_directory_matches_transformers(hf_model, hf_dir):
    ours, args = our_model(hf_dir)
    assert args.max_seq_len == 64 and args.kv_heads == 2 and args.rope_theta == 5000.0
    diff = (our_logits(ours) - hf_logits(hf_model)).abs().max().item()
    assert diff < ATOL, diff


def test_sharded_tied_and_bf16_checkpoints(tmp_path):
    tied = make_hf(seed=1, tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ours, _ = our_model(tmp_path / "sharded")
    assert (our_logits(ours) - hf_logits(tied)).abs().max().item() < ATOL

    rounded = make_hf(seed=2)
    with torch.no_grad():  # fp32 weights holding exactly the bf16 values
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    copy.deepcopy(rounded).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ckpt = open_checkpoint(tmp_path / "bf16")
    assert ckpt.dtype == torch.bfloat16
    ours, _ = our_model(tmp_path / "bf16")
    assert ours.output.weight.dtype == torch.float32  # computed in fp32
    reference = hf_logits(rounded)  # the same bf16 weights, computed in fp32
    assert (our_logits(ours) - reference).abs().max().item() < ATOL


def _meta_rows(w, heads):
    # Independent of edgelora.models.hf: HF rotate-half rows -> Meta's interleaved pairs.
    out_dim = w.shape[0]
    return w.view(heads, 2, out_dim // heads // 2, -1).transpose(1, 2).reshape(w.shape)


def _meta_state_dict(hf_model, torchtune=False):
    cfg = hf_model.config
    sd = hf_model.state_dict()
    names = {
        "q_proj": ("attention.wq", "attn.q_proj"),
        "k_proj": ("attention.wk", "attn.k_proj"),
        "v_proj": ("attention.wv", "attn.v_proj"),
        "o_proj": ("attention.wo", "attn.output_proj"),
        "gate_proj": ("feed_forward.w1", "mlp.w1"),
        "up_proj": ("feed_forward.w3", "mlp.w3"),
        "down_proj": ("feed_forward.w2", "mlp.w2"),
    }
    norm = "scale" if torchtune else "weight"
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        f"norm.{norm}": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}"
        for proj, (meta, tt) in names.items():
            parent = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            w = sd[f"{pre}.{parent}.{proj}.weight"]
            if proj == "q_proj":
                w = _meta_rows(w, cfg.num_attention_heads)
            if proj == "k_proj":
                w = _meta_rows(w, cfg.num_key_value_heads)
            out[f"layers.{i}.{tt if torchtune else meta}.weight"] = w.clone()
        attn_norm, ffn_norm = (
            ("sa_norm", "mlp_norm") if torchtune else ("attention_norm", "ffn_norm")
        )
        out[f"layers.{i}.{attn_norm}.{norm}"] = sd[f"{pre}.input_layernorm.weight"]
        out[f"layers.{i}.{ffn_norm}.{norm}"] = sd[f"{pre}.post_attention_layernorm.weight"]
    return out


def _params(hf_model):
    c = hf_model.config
    return {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "hidden_dim": c.intermediate_size,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": 5000.0,
        "max_seq_len": 64,
    }


def test_meta_and_torchtune_layouts_match_the_same_reference(hf_model, tmp_path):
    reference = hf_logits(hf_model)
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save(_meta_state_dict(hf_model), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps({**_params(hf_model), "vocab_size": -1}))
    ckpt = open_checkpoint(meta)
    assert ckpt.layout == "meta" and ckpt.params["vocab_size"] == 128  # Llama 2's -1 resolved
    ours, _ = our_model(meta)
    assert (our_logits(ours) - reference).abs().max().item() < ATOL

    save_file(_meta_state_dict(hf_model, torchtune=True), str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.layout == "torchtune" and ckpt.params is None  # a bare file needs --params
    model = build_model(ModelArgs.from_dict(_params(hf_model)), seed=5)
    load_checkpoint(model, ckpt)
    assert (our_logits(model) - reference).abs().max().item() < ATOL


def test_unsupported_architectures_and_options_are_named(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cases = {
        "MambaForCausalLM": {"architectures": ["MambaForCausalLM"], "model_type": "mamba"},
        "Qwen3MoeForCausalLM is not supported: mixture-of-experts": {
            "architectures": ["Qwen3MoeForCausalLM"]
        },
        "hidden_act": {"hidden_act": "gelu"},
        "'longrope'": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
        "'yarn'": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
    }
    for match, change in cases.items():
        d = tmp_path / match.strip("'").split()[0]
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        (d / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        with pytest.raises(ConfigError, match=match):
            open_checkpoint(d)


def test_truncated_and_missing_checkpoints(hf_dir, tmp_path):
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        open_checkpoint(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_checkpoint(tmp_path / "empty")


# --- adapters -----------------------------------------------------------------------------


ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all7": dict(r=4, lora_alpha=16, target_modules=ALL7),
    "rslora": dict(r=8, lora_alpha=4, target_modules=ALL7, use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL7,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"mlp.up_proj": 3},
    ),
    "layers": dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], layers_to_transform=[1]),
    "regex": dict(
        r=2, lora_alpha=4, target_modules=r".*layers\.0\.(self_attn\.q_proj|mlp\.\w+_proj)"
    ),
    "all-linear": dict(r=2, lora_alpha=2, target_modules="all-linear"),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_peft_adapters_match_peft_and_merge(hf_model, hf_dir, tmp_path, kind):
    peft_model = peft_adapter(hf_model, tmp_path / kind, **ADAPTERS[kind])
    ours, args = our_model(hf_dir)
    adapter = load_adapter(tmp_path / kind, args)
    expected = {
        "qv": 4,
        "all7": 14,
        "rslora": 14,
        "patterns": 14,
        "layers": 2,
        "regex": 4,
        "all-linear": 14,
    }[kind]
    assert len(adapter.modules) == expected
    if kind == "patterns":
        assert adapter.modules["layers.1.attention.wq"].rank == 2
        assert adapter.modules["layers.0.attention.wq"].rank == 4
        assert adapter.modules["layers.0.feed_forward.w2"].rank == 6
        assert adapter.modules["layers.1.feed_forward.w3"].alpha == 3
    reference = hf_logits(peft_model)
    base = our_logits(ours)
    attach_adapter(ours, adapter)
    with_adapter = our_logits(ours)
    detach_adapters(ours)
    assert (with_adapter - base).abs().max() > 100 * ATOL  # the adapter does something
    assert (with_adapter - reference).abs().max().item() < ATOL

    merged_reference = hf_logits(peft_model.merge_and_unload())
    merge_adapter(ours, adapter)
    assert (our_logits(ours) - merged_reference).abs().max().item() < ATOL
    assert (our_logits(ours) - with_adapter).abs().max().item() < ATOL


def test_torchtune_adapter_equals_peft_adapter(hf_model, hf_dir, tmp_path):
    peft_adapter(hf_model, tmp_path / "peft", **ADAPTERS["all7"])
    raw = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    tt_names = {
        "self_attn.q_proj": "attn.q_proj",
        "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj",
        "self_attn.o_proj": "attn.output_proj",
        "mlp.gate_proj": "mlp.w1",
        "mlp.up_proj": "mlp.w3",
        "mlp.down_proj": "mlp.w2",
    }
    tt = {}
    for key, t in raw.items():
        body = key.removeprefix("base_model.model.model.")
        layer, rest = body.split(".", 2)[1], body.split(".", 2)[2]
        module, half = rest.rsplit(".lora_", 1)
        half = half.split(".")[0].lower()
        if half == "b" and module.endswith(("q_proj", "k_proj")):  # torchtune: Meta row order
            t = _meta_rows(t, 4 if module.endswith("q_proj") else 2)
        tt[f"layers.{layer}.{tt_names[module]}.lora_{half}.weight"] = t
    (tmp_path / "tt").mkdir()
    torch.save(tt, tmp_path / "tt" / "adapter_model.pt")
    tt_config = {"r": 4, "lora_alpha": 16, "peft_type": "LORA"}
    tt_config["target_modules"] = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]
    (tmp_path / "tt" / "adapter_config.json").write_text(json.dumps(tt_config))

    ours, args = our_model(hf_dir)
    logits = {}
    for name in ("peft", "tt"):
        attach_adapter(ours, load_adapter(tmp_path / name, args))
        logits[name] = our_logits(ours)
        detach_adapters(ours)
    assert torch.equal(logits["peft"], logits["tt"])


def test_scale_multiplies_the_contribution(hf_model, hf_dir, tmp_path):
    peft_adapter(hf_model, tmp_path / "a", **ADAPTERS["qv"])
    halved = peft_adapter(hf_model, tmp_path / "half", **{**ADAPTERS["qv"], "lora_alpha": 4})
    ours, args = our_model(hf_dir)
    attach_adapter(ours, load_adapter(tmp_path / "a", args, scale=0.5))
    assert (our_logits(ours) - hf_logits(halved)).abs().max().item() < ATOL
    detach_adapters(ours)
    with pytest.raises(AdapterError, match="scale must be a finite number"):
        load_adapter(tmp_path / "a", args, scale=float("nan"))


# --- bad adapters -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_adapter(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "qv"
    peft_adapter(hf_model, path, **ADAPTERS["qv"])
    return path


def _variant(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    raw = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(raw) if tensors else raw, str(dst / "adapter_model.safetensors"))
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def _other_model_adapter(raw):
    return {k: torch.zeros(v.shape[0], 32) if ".lora_A." in k else v for k, v in raw.items()}


BAD = {
    "use_dora": ({"use_dora": True}, None, "'use_dora'=True is not supported: DoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "'modules_to_save'"),
    "lm_head": ({"target_modules": ["q_proj", "lm_head"]}, None, "lm_head"),
    "embedding": ({"target_modules": ["embed_tokens"]}, None, "embedding LoRA"),
    "bias": ({"bias": "all"}, None, "'bias'='all' is not supported"),
    "pissa": ({"init_lora_weights": "pissa"}, None, "rewrites the base weights"),
    "unknown": ({"use_magic": 3}, None, "'use_magic'=3 is not supported"),
    "prompt": ({"peft_type": "PROMPT_TUNING"}, None, "peft_type 'PROMPT_TUNING'"),
    "bad_name": ({"target_modules": ["q_proj", "qkv"]}, None, r"\['qkv'\] match no module"),
    "rank": ({"r": 8}, None, "gives it rank 8"),
    "missing": (None, lambda r: {k: v for k, v in r.items() if "layers.1.self_attn.v" not in k},
                r"no tensors for 1 targeted module.*layers.1.self_attn.v_proj"),
    "half": (None, lambda r: {k: v for k, v in r.items() if k != Q0.format("B")},
             "layers.0.self_attn.q_proj has no lora_B"),
    "extra": (None, lambda r: {**r, Q0.replace("0", "5", 1).format("A"): r[Q0.format("A")] * 1},
              "layers.5.self_attn.q_proj, which is not a projection of this model"),
    "untargeted": (None, lambda r: {**r, Q0.replace("q_proj", "k_proj").format("A"):
                                    r[Q0.format("A")].clone()}, "which adapter_config.json does not target"),
    "nan": (None, lambda r: {**r, Q0.format("A"): r[Q0.format("A")] * float("nan")}, "NaN"),
    "shapes": (None, _other_model_adapter, r"lora_A must be \[4, 64\].*\[4, 32\].*another model"),
    "not_lora": (None, lambda r: {**r, "model.norm.weight": torch.ones(64)}, "not a LoRA weight"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_named_errors(hf_model, good_adapter, tmp_path, case):
    config, tensors, match = BAD[case]
    d = _variant(good_adapter, tmp_path / case, config, tensors)
    args = ModelArgs.from_dict(_params(hf_model))
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(d, args)
    assert case in str(info.value)  # the message names the file
