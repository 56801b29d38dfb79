"""LoRA adapters in PEFT's on-disk layout, and attaching/detaching them on a ``Transformer``.

A PEFT adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, optional ``use_rslora``) and ``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Hugging Face projection
names map onto the model's modules through :data:`HF_TO_MODULE`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgelora._jsonfile import read_json
from edgelora.errors import AdapterError
from edgelora.models.lora import LoRALinear

# Hugging Face projection name -> path of the module inside a TransformerBlock.
HF_TO_MODULE = {
    "q_proj": "attention.wq",
    "k_proj": "attention.wk",
    "v_proj": "attention.wv",
    "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1",
    "up_proj": "feed_forward.w3",
    "down_proj": "feed_forward.w2",
}
MODULE_TO_HF = {v.split(".")[-1]: k for k, v in HF_TO_MODULE.items()}
_HF_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
    r"\.lora_(A|B)(?:\.[A-Za-z_][\w-]*)?\.weight$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class LoRAWeights:
    """One adapted projection: ``lora_a`` is ``[rank, in]``, ``lora_b`` is ``[out, rank]``."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class Adapter:
    """A named adapter: model module FQN (e.g. ``layers.0.attention.wq``) -> its weights."""

    name: str
    modules: dict[str, LoRAWeights] = field(default_factory=dict)
    source: str = ""

    @property
    def num_bytes(self) -> int:
        return sum(w.lora_a.nbytes + w.lora_b.nbytes for w in self.modules.values())


def validate_adapter_name(name: str) -> str:
    """Adapter names become file names: a plain word, no path separators."""
    if not _NAME.match(name) or name in ("base", "foundation", "manifest"):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
            "(not starting with '.' and not 'base', 'foundation' or 'manifest')"
        )
    return name


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    cfg = read_json(cfg_path, AdapterError, "adapter config")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{cfg_path}: field 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{cfg_path}: field 'lora_alpha' must be a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(
            f"{cfg_path}: field 'target_modules' must be a non-empty list of names "
            f"({', '.join(HF_TO_MODULE)}), got {targets!r}"
        )
    unknown = [t for t in targets if t not in HF_TO_MODULE]
    if unknown:
        raise AdapterError(
            f"{cfg_path}: target_modules {unknown} are not projections of this model; "
            f"supported: {sorted(HF_TO_MODULE)}"
        )
    if cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: field 'use_dora' is true; DoRA adapters are not supported")
    return cfg


def load_peft_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read a PEFT LoRA adapter directory.

    Raises :class:`AdapterError` naming the file and key for a missing file, a malformed config,
    a key that is not a LoRA projection weight, a module outside ``target_modules``, an A/B pair
    with one half missing, or ranks that disagree with ``r``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    name = validate_adapter_name(name if name is not None else path.name)
    cfg = _read_config(path)
    r, alpha = cfg["r"], float(cfg.get("lora_alpha", cfg["r"]))
    use_rslora = bool(cfg.get("use_rslora", False))
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: adapter weights not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{weights_path}: key {key!r} is not a LoRA weight of a Llama projection "
                "(expected e.g. 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')"
            )
        layer, parent, proj, half = m.groups()
        if proj not in HF_TO_MODULE or _HF_PARENT[proj] != parent:
            raise AdapterError(
                f"{weights_path}: key {key!r} names unknown projection {parent}.{proj}"
            )
        if proj not in cfg["target_modules"]:
            raise AdapterError(
                f"{weights_path}: key {key!r} adapts {proj}, which is not in target_modules "
                f"{cfg['target_modules']} of {path / CONFIG_FILE}"
            )
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise AdapterError(
                f"{weights_path}: key {key!r} must be a 2-D float tensor, got "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: key {key!r} holds NaN or infinite values")
        fqn = f"layers.{layer}.{HF_TO_MODULE[proj]}"
        halves.setdefault(fqn, {})[half] = tensor.float()

    adapter = Adapter(name=name, source=str(path))
    for fqn, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"{weights_path}: module {fqn} has no lora_{missing} weight")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"{weights_path}: module {fqn} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but adapter_config.json says r={r}"
            )
        adapter.modules[fqn] = LoRAWeights(a, b, alpha, use_rslora)
    if not adapter.modules:
        raise AdapterError(f"{weights_path}: no LoRA weights in the file")
    return adapter


def save_peft_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (single rank/alpha across modules)."""
    from safetensors.torch import save_file

    path = Path(path)
    ranks = {w.rank for w in adapter.modules.values()}
    alphas = {w.alpha for w in adapter.modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise AdapterError("save_peft_adapter writes adapters with one rank and alpha only")
    tensors, targets = {}, set()
    for fqn, w in adapter.modules.items():
        _, layer, _, leaf = fqn.split(".")
        proj = MODULE_TO_HF[leaf]
        targets.add(proj)
        base = f"base_model.model.model.layers.{layer}.{_HF_PARENT[proj]}.{proj}"
        tensors[f"{base}.lora_A.weight"] = w.lora_a.contiguous()
        tensors[f"{base}.lora_B.weight"] = w.lora_b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "target_modules": sorted(targets),
        "use_rslora": any(w.use_rslora for w in adapter.modules.values()),
        "bias": "none",
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def random_adapter(
    model: nn.Module,
    name: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = tuple(HF_TO_MODULE),
    seed: int = 0,
    std: float = 0.1,
) -> Adapter:
    """A deterministic adapter with non-zero A and B on ``targets`` of every layer (demo/tests)."""
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=validate_adapter_name(name), source=f"random(seed={seed})")
    for i in range(len(model.layers)):
        for proj in targets:
            fqn = f"layers.{i}.{HF_TO_MODULE[proj]}"
            lin = model.get_submodule(fqn)
            a = torch.randn(rank, lin.in_features, generator=gen) * std
            b = torch.randn(lin.out_features, rank, generator=gen) * std
            adapter.modules[fqn] = LoRAWeights(a, b, alpha)
    return adapter


def attach_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Wrap each adapted projection of ``model`` in a :class:`LoRALinear` holding the adapter.

    The base linear is wrapped, not copied (a quantized base stays shared). Raises
    :class:`AdapterError` if a module does not exist, is not a plain projection, or the
    adapter's shapes do not fit it.
    """
    for fqn, w in adapter.modules.items():
        parent_name, _, leaf = fqn.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            base = getattr(parent, leaf)
        except AttributeError:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.source}): module {fqn} does not exist in "
                f"this model ({len(model.layers)} layers)"
            ) from None
        if isinstance(base, LoRALinear):
            raise AdapterError(f"adapter {adapter.name!r}: {fqn} already has an adapter attached")
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"adapter {adapter.name!r}: {fqn} is not a linear projection")
        want_a = (w.rank, base.in_features)
        want_b = (base.out_features, w.rank)
        if tuple(w.lora_a.shape) != want_a or tuple(w.lora_b.shape) != want_b:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.source}): {fqn} is "
                f"[{base.out_features} x {base.in_features}] so lora_A must be {list(want_a)} "
                f"and lora_B {list(want_b)}; got {list(w.lora_a.shape)} and {list(w.lora_b.shape)}"
            )
        wrapped = LoRALinear(base, rank=w.rank, alpha=w.alpha, use_rslora=w.use_rslora)
        with torch.no_grad():
            wrapped.lora_a.weight.copy_(w.lora_a)
            wrapped.lora_b.weight.copy_(w.lora_b)
        setattr(parent, leaf, wrapped)
    return model


def detach_adapters(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by the base linear it wraps (undoes ``attach_adapter``)."""
    for fqn, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, module.linear)
    return model


def is_adapter_fqn(fqn: str) -> bool:
    """True for parameters of adapter matrices (an FQN component is ``lora_a``/``lora_b``)."""
    return not {"lora_a", "lora_b"}.isdisjoint(fqn.split("."))
