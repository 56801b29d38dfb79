"""A tiny ``LlamaForCausalLM`` (transformers) and PEFT adapters, made offline for the tests.

Tolerance for fp32 logit comparisons: 1e-5 absolute. The logits are O(1); the implementations
differ only in float summation order and in computing rope tables in fp64 vs fp32 (~2e-7 here).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ATOL = 1e-5
# Exported fp32 programs on the runtime vs transformers: XNNPACK's fp32 GEMMs sum in another
# order than PyTorch (measured ~1e-6 here; logits are O(1)).
RUNTIME_ATOL = 1e-4
PROMPT = torch.tensor([[1, 5, 9, 14, 3, 27, 8, 2, 77, 100]])
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=5000.0,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def _random_model(model_cls, config, seed):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02): make the logits non-trivial
        for name, p in model.named_parameters():  # and biases/norms non-trivial: a dropped one
            if "norm" in name:  # shows (Gemma stores norms as offsets from 1: 1 + w either way)
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(std=0.1)
            else:  # biases
                p.normal_(std=0.1)
    return model


def make_hf(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _random_model(LlamaForCausalLM, LlamaConfig(**{**HF_CONFIG, **overrides}), seed)


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits[0].float()


def our_logits(model) -> torch.Tensor:
    model.reset_cache()
    with torch.no_grad():
        return model(PROMPT, torch.tensor([0]))[0]


def peft_adapter(hf_model, path, seed=0, **config):
    """A PEFT adapter with non-zero lora_B (PEFT's default zero B would make tests vacuous)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(hf_model), LoraConfig(init_lora_weights=False, **config)
    ).eval()
    bs = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert bs and all(b.abs().max() > 0 for b in bs)
    peft_model.save_pretrained(path)
    return peft_model


# A tiny dense DeepSeek-V3 (MLA attention): every layer dense (first_k_dense_replace = layers).
DEEPSEEK_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    first_k_dense_replace=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=10,
    max_position_embeddings=64,
    rope_theta=5000.0,
)
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def make_deepseek(seed=0, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{**DEEPSEEK_CONFIG, **overrides})
    return _random_model(DeepseekV3ForCausalLM, config, seed)


def program_logits(out, name) -> torch.Tensor:
    """Logits of ``PROMPT`` from program ``name`` of export directory ``out`` on the runtime."""
    from edgelora.format.layout import FOUNDATION_FILE
    from edgelora.runtime.program import LlamaProgram

    return LlamaProgram(out / f"{name}.pte", out / FOUNDATION_FILE).forward(PROMPT[0].tolist(), 0)


# --- The families (tiny, 2 layers; every config feature that changes the math is set) -----


@dataclass(frozen=True)
class Family:
    """A tiny random model of one HF family and the PEFT targets users train on it."""

    classes: tuple[str, str]  # transformers config class, model class
    config: dict
    lora: dict  # LoraConfig arguments (target_modules)
    expect: dict = field(default_factory=dict)  # ModelArgs fields the reader must set

    def check_args(self, args) -> None:
        got = {k: getattr(args, k) for k in self.expect}
        assert got == self.expect, got


# The families' tiny shape: HF_CONFIG's (each family keeps its own rotary base), small ids.
_BASE = {k: v for k, v in HF_CONFIG.items() if k != "rope_theta"} | dict(
    bos_token_id=1, eos_token_id=2, pad_token_id=0
)
_ATTN_MLP = dict(target_modules=ALL7)
FAMILIES = {
    "llama-bias": Family(
        ("LlamaConfig", "LlamaForCausalLM"),
        dict(attention_bias=True, mlp_bias=True, rope_theta=5000.0),
        _ATTN_MLP,
        {"attention_bias": True, "attention_out_bias": True, "mlp_bias": True},
    ),
    "mistral": Family(
        ("MistralConfig", "MistralForCausalLM"),
        dict(sliding_window=4, head_dim=16),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        {"sliding_window": 4, "layer_types": ("sliding", "sliding")},
    ),
    "qwen2": Family(
        ("Qwen2Config", "Qwen2ForCausalLM"),
        dict(tie_word_embeddings=True),
        _ATTN_MLP,
        {"attention_bias": True, "attention_out_bias": False},
    ),
    "qwen3": Family(
        ("Qwen3Config", "Qwen3ForCausalLM"),
        dict(head_dim=32),
        _ATTN_MLP,
        {"qk_norm": True, "head_dim": 32},
    ),
    "gemma3": Family(
        ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            final_logit_softcapping=30.0,
            hidden_activation="gelu_pytorch_tanh",
            bos_token_id=2,
            eos_token_id=1,
        ),
        _ATTN_MLP,
        {"sandwich_norms": True, "norm_offset": 1.0, "hidden_act": "gelu_tanh"},
    ),
    "smollm3": Family(
        ("SmolLM3Config", "SmolLM3ForCausalLM"),
        dict(no_rope_layers=[1, 0]),
        _ATTN_MLP,
        {"nope_layers": (1,)},
    ),
    "granite": Family(
        ("GraniteConfig", "GraniteForCausalLM"),
        dict(
            embedding_multiplier=6.0,
            attention_multiplier=0.05,
            residual_multiplier=0.3,
            logits_scaling=4.0,
            attention_bias=True,
        ),
        _ATTN_MLP,
        {"embedding_scale": 6.0, "residual_scale": 0.3, "logits_scaling": 4.0},
    ),
    "phi3": Family(
        ("Phi3Config", "Phi3ForCausalLM"),
        dict(
            partial_rotary_factor=0.75,
            original_max_position_embeddings=64,
            tie_word_embeddings=True,
        ),
        dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        {"family": "phi3", "rope_dim": 12},
    ),
}


def make_family(name: str, seed: int = 0, **overrides):
    import transformers

    fam = FAMILIES[name]
    config_cls, model_cls = (getattr(transformers, c) for c in fam.classes)
    config = config_cls(**{**_BASE, **fam.config, **overrides})
    return _random_model(model_cls, config, seed)


# --- A family's directory: model, adapter, reference logits -------------------------


def make_family_dir(root: Path, name: str) -> None:
    """``root/model`` (a tiny HF model of family ``name``), ``root/lora`` (a PEFT adapter on
    its usual targets) and ``root/refs.pt``: transformers (+ PEFT) logits of base, lora and
    the merged adapter. The qwen3 model also ships a tokenizer.json (with ChatML's special
    tokens) and a chat_template.jinja, and says bos 3 and eos [7, t], t being the third token
    its greedy decode of PROMPT_TEXT generates."""

    # One layer unless the family's point needs two (a sliding and a full layer; a NoPE one).
    hf = make_family(name, seed=1, num_hidden_layers=2 if name in ("gemma3", "smollm3") else 1)
    lora = peft_adapter(hf, root / "lora", seed=2, r=4, lora_alpha=8, **FAMILIES[name].lora)
    refs = {"base": hf_logits(hf), "lora": hf_logits(lora)}
    refs["merged"] = hf_logits(copy.deepcopy(lora).merge_and_unload())
    if name == "qwen3":
        from tokenizers import Tokenizer

        from edgelora.runtime.tokenizer import write_char_tokenizer

        tok = write_char_tokenizer(root / "tokenizer.json", hf.config.vocab_size)
        chat_tokens(tok)
        ids = Tokenizer.from_file(str(tok)).encode(PROMPT_TEXT).ids
        seq = list(ids)
        with torch.no_grad():
            for _ in range(3):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        stop = seq[-1]
        hf.config.bos_token_id, hf.config.eos_token_id = 3, [7, stop]
        hf.generation_config.bos_token_id, hf.generation_config.eos_token_id = 3, [7, stop]
        refs["greedy"] = seq[len(ids) :]
    hf.save_pretrained(root / "model")
    if name == "qwen3":
        import shutil

        from .chat_templates import QWEN3

        shutil.move(str(root / "tokenizer.json"), root / "model" / "tokenizer.json")
        (root / "model" / "chat_template.jinja").write_text(QWEN3)
    torch.save(refs, root / "refs.pt")


PROMPT_TEXT = "the lazy fox"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # the last two ids of the qwen3 fixture's vocab


def chat_tokens(path: Path) -> None:
    """Make the last two filler tokens of a :func:`write_char_tokenizer` file ChatML's special
    tokens (the vocabulary's size stays the model's)."""
    tok = json.loads(path.read_text())
    for entry, content in zip(tok["added_tokens"][-2:], CHAT_TOKENS, strict=True):
        entry.update(content=content, special=True)
    path.write_text(json.dumps(tok))
