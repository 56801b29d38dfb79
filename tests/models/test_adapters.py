import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgelora.errors import AdapterError
from edgelora.models.adapters import (
    HF_TO_MODULE,
    attach_adapter,
    detach_adapters,
    load_peft_adapter,
    random_adapter,
    save_peft_adapter,
)
from edgelora.models.llama import build_model
from edgelora.models.lora import LoRALinear


def test_round_trip_and_attach_all_seven(tiny_args, tmp_path):
    model = build_model(tiny_args)
    adapter = random_adapter(model, "x", rank=3, alpha=6, seed=0)
    loaded = load_peft_adapter(save_peft_adapter(adapter, tmp_path / "x"))
    assert loaded.name == "x" and set(loaded.modules) == set(adapter.modules)
    assert len(loaded.modules) == 7 * tiny_args.n_layers
    for fqn, w in adapter.modules.items():
        assert torch.equal(loaded.modules[fqn].lora_a, w.lora_a)
        assert loaded.modules[fqn].alpha == 6 and loaded.modules[fqn].rank == 3
    tokens, pos = torch.tensor([[1, 2, 3]]), torch.tensor([0])
    with torch.no_grad():
        before = model(tokens, pos)
        attach_adapter(model, loaded)
        wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        assert sorted(wrapped) == sorted(adapter.modules)
        model.reset_cache()
        with_adapter = model(tokens, pos)
        detach_adapters(model)
        model.reset_cache()
        after = model(tokens, pos)
    assert (with_adapter - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before)


def test_peft_library_layout_is_read(tmp_path):
    """An adapter saved by PEFT itself on a transformers Llama maps onto our module names."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(HF_TO_MODULE), init_lora_weights=False)
    get_peft_model(hf, cfg).save_pretrained(tmp_path / "peft")
    adapter = load_peft_adapter(tmp_path / "peft", "p")
    raw = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(adapter.modules) == 14
    w = adapter.modules["layers.1.feed_forward.w1"]  # gate_proj
    assert torch.equal(w.lora_a, raw["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"])
    assert w.lora_b.shape == (64, 4) and w.alpha == 8.0
    assert adapter.modules["layers.0.attention.wk"].lora_b.shape == (16, 4)  # GQA: 2 kv heads


def _write(tmp_path, config, tensors, name="ad"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
GOOD_CFG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def _pair(r=2, i=64, o=64):
    return {KEY.format("A"): torch.zeros(r, i), KEY.format("B"): torch.zeros(o, r)}


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ({**GOOD_CFG, "r": 0}, _pair(), "'r' must be a positive integer"),
        ({**GOOD_CFG, "r": "2"}, _pair(), "'r' must be a positive integer"),
        ({**GOOD_CFG, "target_modules": ["qkv"]}, _pair(), r"target_modules \['qkv'\]"),
        ({**GOOD_CFG, "use_dora": True}, _pair(), "use_dora"),
        ({**GOOD_CFG, "target_modules": ["v_proj"]}, _pair(), "not in target_modules"),
        (GOOD_CFG, {KEY.format("A"): torch.zeros(2, 64)}, "no lora_B"),
        (GOOD_CFG, _pair(r=3), "r=2"),
        (GOOD_CFG, {"model.embed_tokens.lora_A.weight": torch.zeros(2, 2)}, "embed_tokens"),
        (GOOD_CFG, {**_pair(), KEY.format("A"): torch.full((2, 64), float("nan"))}, "NaN"),
    ],
)
def test_bad_adapters_are_named_errors(tmp_path, config, tensors, match):
    d = _write(tmp_path, config, tensors)
    with pytest.raises(AdapterError, match=match) as info:
        load_peft_adapter(d)
    assert "ad" in str(info.value)  # the message names the file


def test_adapter_that_does_not_fit_the_model(tiny_args, tmp_path):
    model = build_model(tiny_args)
    wrong_shape = load_peft_adapter(_write(tmp_path, GOOD_CFG, _pair(i=32), "shape"))
    with pytest.raises(AdapterError, match=r"layers.0.attention.wq is \[64 x 64\].*\[2, 32\]"):
        attach_adapter(model, wrong_shape)
    deep = {k.replace("layers.0", "layers.7"): v for k, v in _pair().items()}
    with pytest.raises(AdapterError, match="layers.7.attention.wq does not exist"):
        attach_adapter(model, load_peft_adapter(_write(tmp_path, GOOD_CFG, deep, "deep")))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".hidden", "base", "foundation"])
def test_unsafe_adapter_names_are_refused(tmp_path, name):
    d = _write(tmp_path, GOOD_CFG, _pair())
    with pytest.raises(AdapterError, match="not allowed"):
        load_peft_adapter(d, name)


def test_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_peft_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json: adapter config not found"):
        load_peft_adapter(tmp_path / "empty")
