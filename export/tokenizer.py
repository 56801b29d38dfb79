"""The tokenizer an export ships: checked at export time with the parser ExecuTorch's runner
uses (``pytorch_tokenizers``), so a file the device cannot read fails here, naming the reason."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgelora.errors import ConfigError


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """Load ``path`` as ExecuTorch's runner does (a Hugging Face ``tokenizer.json``);
    :class:`ConfigError` naming the file and the parser's reason if it cannot, or if its ids
    do not fit the model's vocabulary."""
    from pytorch_tokenizers import CppHFTokenizer

    tok = CppHFTokenizer()
    # The parser logs its reason to the process's stderr (C++), then raises a bare error:
    # capture the file descriptor to give the reason in the message.
    with tempfile.TemporaryFile(mode="w+b") as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            tok.load(str(path))
            failure = None
        except RuntimeError as e:
            failure = str(e)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        log = err.read().decode(errors="replace")
    if failure is not None:
        reasons = [line.split("] ", 1)[-1] for line in log.splitlines() if line.startswith("E ")]
        raise ConfigError(
            f"{path}: ExecuTorch's tokenizer parser cannot read this file "
            f"({'; '.join(reasons) or failure}); the runner on the device would fail the same way"
        )
    if tok.vocab_size() > vocab_size:
        raise ConfigError(
            f"{path}: the tokenizer has {tok.vocab_size()} ids, the model's vocabulary {vocab_size}"
        )
