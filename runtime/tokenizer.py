"""A small character-level tokenizer for demos and tests, made offline with ``tokenizers``.

It is a byte-level BPE ``tokenizer.json`` without merges (one token per character of its
alphabet) that ExecuTorch's runner reads. Ids: 0 ``<unk>``, 1 ``<s>`` (BOS), 2 ``</s>`` (EOS),
then the alphabet, then ``<xN>`` fillers up to the model's vocabulary size, so every id a model
can emit decodes to plain ASCII.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a tiny model speaks in tiny words, "
    "and lora adapters make it say new things! 0123456789"
)
SPECIALS = ["<unk>", "<s>", "</s>"]


def write_char_tokenizer(path: str | Path, vocab_size: int, corpus: str = DEFAULT_CORPUS) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted({c for word, _ in byte_level.pre_tokenize_str(corpus) for c in word})
    base = len(SPECIALS) + len(alphabet)
    if vocab_size < base:
        raise ValueError(f"vocab_size {vocab_size} < {base} (specials + the corpus alphabet)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([corpus], trainer)
    tok.add_tokens([f"<x{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size
    path = Path(path)
    tok.save(str(path))
    return path
