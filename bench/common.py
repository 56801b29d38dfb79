"""What the benchmarks share, in one place: the model configs and real-model shapes they
measure, the prompt and the speed measurement every runtime figure comes from, and an export
run as a user runs it (``export_llama`` in a fresh process)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

# Random-weight configs (Meta params.json fields) the speed and size benchmarks export.
CONFIGS = {
    "stories15m": {
        "dim": 288,
        "n_layers": 6,
        "n_heads": 6,
        "vocab_size": 32000,
        "multiple_of": 32,
        "max_seq_len": 256,
    },
    "stories110m": {
        "dim": 768,
        "n_layers": 12,
        "n_heads": 12,
        "vocab_size": 32000,
        "multiple_of": 32,
        "max_seq_len": 256,
    },
    "mla-small": {
        "dim": 512,
        "n_layers": 8,
        "n_heads": 8,
        "vocab_size": 32000,
        "multiple_of": 32,
        "max_seq_len": 256,
        "attention_type": "mla",
        "q_lora_rank": 192,
        "kv_lora_rank": 128,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
    },
    # Qwen3-0.6B's shapes (head_dim 128 > dim / heads, q/k norms, vocabulary 151936) with 4 of
    # its 28 layers: the family's per-layer cost and its large output layer, in benchmark time.
    "qwen3-0.6b-4l": {
        "dim": 1024,
        "n_layers": 4,
        "n_heads": 16,
        "n_kv_heads": 8,
        "head_dim_override": 128,
        "qk_norm": True,
        "hidden_dim": 3072,
        "vocab_size": 151936,
        "norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_seq_len": 256,
    },
    "tiny": {
        "dim": 64,
        "n_layers": 1,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 256,
        "multiple_of": 32,
        "max_seq_len": 160,
    },
}

# Real models' shapes (config.json fields; random weights) for the memory and size runs.
SHAPES = {
    "llama-3.2-1b": dict(
        family="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama-3.2-3b": dict(
        family="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "qwen3-4b": dict(
        family="qwen3",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1000000.0,
    ),
}

PROMPT_LEN = 128
DECODE_STEPS = 64


def _prompt(vocab: int) -> list[int]:
    return [(7 * i) % (vocab - 3) + 3 for i in range(PROMPT_LEN)]


def measure(program, vocab: int) -> dict:
    """Prefill (median of 3), TTFT and decode on a loaded LlamaProgram."""
    prompt = _prompt(vocab)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        logits = program.forward(prompt, 0)
        int(logits[-1].argmax())
        times.append(time.perf_counter() - t)
    gen = program.generate(prompt[:8], DECODE_STEPS + 1)
    return {
        "prefill_tokens_per_s": PROMPT_LEN / statistics.median(times),
        "time_to_first_token_ms": 1e3 * statistics.median(times),
        "decode_ms_per_token": gen.decode_ms_per_token,
    }


def export(flags: list[str], checkpoint: Path, out: Path) -> float:
    argv = [sys.executable, "-m", "edgelora.export.cli", "--checkpoint", str(checkpoint)]
    argv += [*flags, "--max-seq-len", "512", "--output-dir", str(out), "--overwrite"]
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"export {flags} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t
