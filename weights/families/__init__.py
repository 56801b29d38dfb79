"""Hugging Face model families: one class per family, one file each, registered by the
``architectures`` names its ``config.json`` carries (``@register("Qwen3ForCausalLM")``, as
llama.cpp's ``convert_hf_to_gguf.py`` does). A new Llama-like family is one file here: a
:class:`~edgelora.weights.families.base.Family` subclass whose ``read_config`` starts from
``decoder_fields`` and adds (or refuses) what the family changes -- and, if its checkpoints name
tensors otherwise, its ``projections``/``norms`` or ``map_tensor`` -- and its import below.
"""

from edgelora.weights.families import (  # noqa: F401 - importing a family registers it
    deepseek,
    gemma3,
    granite,
    llama,
    mistral,
    phi3,
    qwen2,
    qwen3,
    smollm3,
)
from edgelora.weights.families.base import (
    REGISTRY,
    Family,
    all_projections,
    check_field_types,
    family_of,
    register,
    registered,
)

__all__ = [
    "REGISTRY",
    "Family",
    "all_projections",
    "check_field_types",
    "family_of",
    "register",
    "registered",
]
