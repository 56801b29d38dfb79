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
    monkeypatch.setattr(families.base, "REGISTRY", dict(REGISTRY))  # undone after the test
    monkeypatch.setattr(families, "REGISTRY", families.base.REGISTRY)
    from edgelora.weights import architectures

    monkeypatch.setattr(architectures, "REGISTRY", families.base.REGISTRY)

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
