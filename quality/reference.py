"""The eager Hugging Face model (transformers, + a peft LoRA adapter) as a
:class:`~edgelora.quality.scoring.Scorer`: the reference an export is measured against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgelora.errors import ConfigError, DependencyError
from edgelora.quality.scoring import greedy_loop


class ReferenceScorer:
    """``transformers`` ``AutoModelForCausalLM`` from ``hf_dir`` in float32 (``lora``: a PEFT
    adapter directory applied with ``peft``, unmerged), on the CPU, without gradients."""

    def __init__(self, hf_dir: str | Path, lora: str | Path | None = None) -> None:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise DependencyError(
                "--reference needs transformers (pip install transformers)"
            ) from None
        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        self.label = f"transformers:{hf_dir.name}"
        if lora is not None:
            try:
                from peft import PeftModel
            except ImportError:
                raise DependencyError("--lora needs peft (pip install peft)") from None
            lora = Path(lora)
            if not (lora / "adapter_config.json").is_file():
                raise ConfigError(f"{lora}: not a PEFT adapter directory (no adapter_config.json)")
            model = PeftModel.from_pretrained(model, lora)
            self.label += f"+peft:{lora.name}"
        self.model = model.eval()
        self.max_seq_len = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self._cache = None
        self._cache_key = "past_key_values"

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    @torch.no_grad()
    def _step(self, tokens: list[int], start: int) -> torch.Tensor:
        if start == 0:
            self._cache = None
        # transformers 5 names the KV cache ``cache`` (``past_key_values`` before)
        kw = {} if self._cache is None else {self._cache_key: self._cache}
        out = self.model(input_ids=torch.tensor([tokens]), use_cache=True, **kw)
        self._cache_key = "cache" if "cache" in out else "past_key_values"
        self._cache = out[self._cache_key]
        return out.logits[0].float()

    def greedy(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[int], bool]
    ) -> list[int]:
        return greedy_loop(self._step, prompt, max_new_tokens, stop)
