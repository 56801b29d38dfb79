import json

import pytest
import torch
from safetensors.torch import save_file

from edgelora.errors import AdapterError
from edgelora.lora.attach import attach_adapter, detach_adapters, merge_adapter
from edgelora.lora.modules import LoRALinear
from edgelora.lora.record import Adapter, LoRAWeights
from edgelora.models.llama import build_model
from edgelora.weights.adapter_files import load_adapter, save_peft_adapter, save_torchtune_adapter
from edgelora.weights.synthetic import random_adapter, random_peft_adapter


def test_round_trip_and_attach_all_seven(tiny_args, tmp_path):
    model = build_model(tiny_args)
    adapter = random_adapter(model, "x", rank=3, alpha=6, seed=0)
    loaded = random_peft_adapter(model, tmp_path / "x", tiny_args, "x", rank=3, alpha=6, seed=0)
    assert loaded.name == "x" and set(loaded.modules) == set(adapter.modules)
    assert len(loaded.modules) == 7 * tiny_args.n_layers
    for fqn, w in adapter.modules.items():
        assert torch.equal(loaded.modules[fqn].lora_a, w.lora_a)
        assert torch.equal(loaded.modules[fqn].lora_b, w.lora_b)  # q/k rows permuted back
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


def test_mixed_ranks_round_trip_through_peft_and_torchtune(tiny_args, tmp_path):
    """Per-module ranks/alphas survive saving (as rank_pattern/alpha_pattern) in both formats."""
    model = build_model(tiny_args)
    adapter = random_adapter(model, "m", rank=2, alpha=4, targets=("q_proj", "down_proj"), seed=3)
    wq = adapter.modules["layers.0.attention.wq"]
    adapter.modules["layers.0.attention.wq"] = LoRAWeights(
        torch.randn(5, wq.lora_a.shape[1]), torch.randn(wq.lora_b.shape[0], 5), alpha=7.0
    )
    for save in (
        lambda p: save_peft_adapter(adapter, p, tiny_args),
        lambda p: save_torchtune_adapter(adapter, p),
    ):
        path = save(tmp_path / str(len(list(tmp_path.iterdir()))))
        loaded = load_adapter(path, tiny_args, "m")
        assert set(loaded.modules) == set(adapter.modules)
        for fqn, w in adapter.modules.items():
            got = loaded.modules[fqn]
            assert (got.rank, got.alpha) == (w.rank, w.alpha), fqn
            assert torch.equal(got.lora_a, w.lora_a) and torch.equal(got.lora_b, w.lora_b), fqn


def test_merge_equals_attached_adapter_and_scale(tiny_args):
    """Merging folds scale * B @ A into W: outputs equal the attached adapter's (fp32, 1e-5:
    only summation order differs), and scale=0 leaves the base unchanged."""
    tokens, pos = torch.tensor([[1, 2, 3, 4]]), torch.tensor([0])
    model = build_model(tiny_args)
    adapter = random_adapter(model, "x", rank=4, alpha=8, seed=1)
    adapter.scale = 0.5
    with torch.no_grad():
        base = model(tokens, pos)
        attach_adapter(model, adapter)
        model.reset_cache()
        attached = model(tokens, pos)
        detach_adapters(model)
        merge_adapter(model, adapter)
        model.reset_cache()
        merged = model(tokens, pos)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (attached - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, attached, atol=1e-5, rtol=0)
    full = random_adapter(build_model(tiny_args), "x", rank=4, alpha=8, seed=1)
    model = build_model(tiny_args)
    attach_adapter(model, full)
    lin = model.layers[0].attention.wq
    x = torch.randn(3, tiny_args.dim)
    expected = lin.linear(x) + (8 / 4) * x @ lin.lora_a.weight.T @ lin.lora_b.weight.T
    torch.testing.assert_close(lin(x), expected)
    zero = Adapter("z", dict(full.modules), scale=0.0)
    detach_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model, zero)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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
    "config, match",
    [
        ({**GOOD_CFG, "r": 0}, "'r' must be a positive integer"),
        ({**GOOD_CFG, "r": "2"}, "'r' must be a positive integer"),
        ({**GOOD_CFG, "lora_alpha": "x"}, "'lora_alpha' must be a number"),
        ({**GOOD_CFG, "target_modules": 3}, "'target_modules' must be a list"),
        ({**GOOD_CFG, "target_modules": "q_proj("}, "not a valid regex"),
        ({**GOOD_CFG, "rank_pattern": {"q_proj": -1}}, "'rank_pattern' must map"),
        ({**GOOD_CFG, "layers_to_transform": ["0"]}, "'layers_to_transform' must be"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_configs_are_named_errors(tiny_args, tmp_path, config, match):
    d = _write(tmp_path, config, _pair())
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(d, tiny_args)
    assert "ad" in str(info.value)  # the message names the file


def test_adapter_that_does_not_fit_the_model(tiny_args, tmp_path):
    model = build_model(tiny_args)
    wrong_shape = Adapter("s", {"layers.0.attention.wq": LoRAWeights(
        torch.zeros(2, 32), torch.zeros(64, 2), 4.0)})  # fmt: skip
    with pytest.raises(
        AdapterError, match=r"layers.0.attention: .*slices \['wq'\].*lora_A \[2, 32\]"
    ):
        attach_adapter(model, wrong_shape)
    deep = Adapter("d", {"layers.7.attention.wq": LoRAWeights(
        torch.zeros(2, 64), torch.zeros(64, 2), 4.0)})  # fmt: skip
    with pytest.raises(AdapterError, match="layers.7.attention.wq does not exist"):
        attach_adapter(model, deep)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".hidden", "base", "foundation"])
def test_unsafe_adapter_names_are_refused(tiny_args, tmp_path, name):
    d = _write(tmp_path, GOOD_CFG, _pair())
    with pytest.raises(AdapterError, match="not allowed"):
        load_adapter(d, tiny_args, name)


def test_missing_files(tiny_args, tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        load_adapter(tmp_path / "nope", tiny_args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json: adapter config not found"):
        load_adapter(tmp_path / "empty", tiny_args)
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(GOOD_CFG))
    with pytest.raises(AdapterError, match="adapter weights not found"):
        load_adapter(tmp_path / "empty", tiny_args)
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(AdapterError, match="adapter_model.bin: not a readable"):
        load_adapter(tmp_path / "empty", tiny_args)
