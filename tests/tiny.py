"""The tiny model configurations the tests use (one place)."""

# The exported model: 1 layer, GQA, vocabulary 96 (exports of it lower in seconds).
TINY = {
    "dim": 64,
    "n_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "multiple_of": 32,
    "max_seq_len": 48,
}
# Eager-only tests: 2 layers, so per-layer mappings are exercised.
TINY_2L = {**TINY, "n_layers": 2, "max_seq_len": 32}
