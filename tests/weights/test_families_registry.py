"""The family registry (``weights/families``): one class per family, each in its own file,
registered by the ``architectures`` names it takes; a family added in one class is found by
name and by ``model_type`` with nothing else edited; every family the fixtures build is
registered, and nothing else is."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from edgelora.errors import ConfigError
from edgelora.weights import families
from edgelora.weights.architectures import args_from_hf_config, find_architecture, registered
from edgelora.weights.families.base import REGISTRY, Family, decoder_fields, register

from ..hf_fixtures import FAMILIES as FIXTURES

SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96}


def test_one_class_per_file():
    modules = [inspect.getmodule(cls) for cls in registered()]
    assert len({m.__name__ for m in modules}) == len(modules)  # one family per module
    for cls, module in zip(registered(), modules, strict=True):
        assert module.__name__.startswith("edgelora.weights.families."), cls
        assert module.__name__ != families.base.__name__
        local = [v for v in vars(module).values() if isinstance(v, type) and
                 issubclass(v, Family) and v.__module__ == module.__name__]  # fmt: skip
        assert local == [cls], (module.__name__, local)


def test_every_fixture_family_is_registered():
    fixture_classes = {fam.classes[1] for fam in FIXTURES.values()} | {"DeepseekV3ForCausalLM"}
    assert set(REGISTRY) == fixture_classes


def test_a_family_added_in_one_class_is_read(monkeypatch):
    _isolated_registry(monkeypatch)

    @register("TinyTestForCausalLM")
    class TinyTest(Family):
        label = "Tiny test"
        model_type = "tiny_test"

        @classmethod
        def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
            return {**decoder_fields(cfg, source), "qk_norm": True}

    cfg = {"architectures": ["TinyTestForCausalLM"], **SIZES}
    assert find_architecture(cfg, "config.json") is TinyTest
    assert find_architecture({"model_type": "tiny_test", **SIZES}, "config.json") is TinyTest
    assert args_from_hf_config(cfg, "config.json")["qk_norm"] is True
    with pytest.raises(ValueError, match="registered twice"):
        register("TinyTestForCausalLM")(type("Again", (Family,), {"label": "again"}))


def test_unknown_and_refused_architectures_are_named():
    with pytest.raises(ConfigError, match=r"NopeForCausalLM is not supported \(supported: "):
        find_architecture({"architectures": ["NopeForCausalLM"]}, "config.json")
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        find_architecture({"architectures": ["Qwen3MoeForCausalLM"]}, "config.json")


def _isolated_registry(monkeypatch):
    """Register test families into a copy of the registry (undone after the test)."""
    from edgelora.weights import architectures

    monkeypatch.setattr(families.base, "REGISTRY", dict(REGISTRY))
    for module in (families, architectures):
        monkeypatch.setattr(module, "REGISTRY", families.base.REGISTRY)


def test_a_family_with_its_own_tensor_names_is_one_class(tmp_path, monkeypatch):
    """A family whose checkpoints name a norm otherwise and carry a tensor we do not use:
    its class's ``norms`` and ``map_tensor`` are all it takes to load one (and its q/k rows
    are put in Meta's rotary order by the shared mapping)."""
    import torch
    from safetensors.torch import save_file

    from edgelora.models.args import ModelArgs
    from edgelora.weights.checkpoint import open_checkpoint
    from edgelora.weights.families.base import LLAMA_NORMS, permute_rows

    _isolated_registry(monkeypatch)

    @register("RenamedForCausalLM")
    class Renamed(Family):
        label = "Renamed"
        model_type = "renamed"
        norms = {**LLAMA_NORMS, "pre_mlp_norm": "ffn_norm"}

        @classmethod
        def map_tensor(cls, key, t, args, source):
            if key.endswith(".self_attn.sink"):
                return []  # dropped: nothing in our model reads it
            return super().map_tensor(key, t, args, source)

    dim, hidden, vocab = 64, 128, 96
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, dim),
        "model.norm.weight": (dim,),
        "model.layers.0.input_layernorm.weight": (dim,),
        "model.layers.0.pre_mlp_norm.weight": (dim,),
        "model.layers.0.self_attn.sink": (4,),
        **{f"model.layers.0.self_attn.{p}_proj.weight": (dim, dim) for p in "qkvo"},
        "model.layers.0.mlp.gate_proj.weight": (hidden, dim),
        "model.layers.0.mlp.up_proj.weight": (hidden, dim),
        "model.layers.0.mlp.down_proj.weight": (dim, hidden),
    }
    sd = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = {**SIZES, "architectures": ["RenamedForCausalLM"], "num_hidden_layers": 1,
           "intermediate_size": hidden}  # fmt: skip
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))

    ckpt = open_checkpoint(tmp_path)
    ours = ckpt.state_dict
    assert ckpt.params["family"] == "renamed"
    assert "layers.0.ffn_norm.weight" in ours and not any("sink" in k for k in ours)
    assert torch.equal(ours["layers.0.ffn_norm.weight"], sd["model.layers.0.pre_mlp_norm.weight"])
    args = ModelArgs.from_dict(ckpt.params)
    want_q = permute_rows(sd["model.layers.0.self_attn.q_proj.weight"], [(0, 4)],
                          args.head_dim, args.rope_dim, to_meta=True)  # fmt: skip
    assert torch.equal(ours["layers.0.attention.wq.weight"], want_q)
    assert torch.equal(ours["output.weight"], ours["tok_embeddings.weight"])  # tied
    with pytest.raises(ConfigError, match="not part of a Renamed checkpoint"):
        Renamed.map_tensor("model.layers.0.extra.weight", sd["model.norm.weight"], args, "x")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_projection_shapes_come_from_the_module_tree(name):
    """Every projection the family names has, in our module tree, the shape transformers'
    module of that name has (the adapter loader checks adapters against these)."""
    from edgelora.models.args import ModelArgs
    from edgelora.weights.adapter_files import projection_shape
    from edgelora.weights.families import family_of

    from ..hf_fixtures import make_family

    model = make_family(name)
    args = ModelArgs.from_dict(args_from_hf_config(model.config.to_dict(), "config.json"))
    family = family_of(args)
    assert family is find_architecture(model.config.to_dict(), "config.json")
    for layer, block in enumerate(model.model.layers):
        for proj, (parent, _) in family.layer_projections(args).items():
            hf = getattr(getattr(block, parent), proj).weight
            assert projection_shape(args, proj, layer) == tuple(hf.shape), (proj, layer)
