"""SmolLM3: ``no_rope_layers[i]`` is 0 for a layer without rotary embeddings."""

from __future__ import annotations

from typing import Any

from edgelora.errors import ConfigError
from edgelora.weights.families.base import Family, decoder_fields, register


@register("SmolLM3ForCausalLM")
class SmolLM3(Family):
    label = "SmolLM3"
    model_type = "smollm3"

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        fields = decoder_fields(cfg, source)
        flags = cfg.get("no_rope_layers")
        if flags is not None:
            if len(flags) != fields["n_layers"]:
                raise ConfigError(
                    f"{source}: no_rope_layers has {len(flags)} entries for {fields['n_layers']} layers"
                )
            fields["nope_layers"] = tuple(i for i, use in enumerate(flags) if not use)
        return fields
