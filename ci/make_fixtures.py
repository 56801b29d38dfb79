"""Write a tiny ``params.json`` and two PEFT adapters for ``ci/test_lora.sh`` (deterministic)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model
from edgelora.weights.adapter_files import save_peft_adapter
from edgelora.weights.synthetic import random_adapter

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128,
    "multiple_of": 32,
    "max_seq_len": 64,
}


def main(argv: list[str] | None = None) -> int:
    root = Path((argv or sys.argv[1:])[0])
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.json").write_text(json.dumps(PARAMS))
    args = ModelArgs.from_dict(PARAMS)
    model = build_model(args)
    save_peft_adapter(
        random_adapter(model, "a", rank=8, alpha=16, seed=1), root / "adapter_a", args
    )
    save_peft_adapter(
        random_adapter(
            model, "b", rank=4, alpha=32, targets=("q_proj", "v_proj", "down_proj"), seed=2
        ),
        root / "adapter_b",
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
