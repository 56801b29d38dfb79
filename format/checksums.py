"""The constant methods every program carries, and the checksums that make it trustworthy.

ExecuTorch's LLM runner reads a program's metadata from zero-argument constant methods
(:data:`RUNNER_METADATA_METHODS`). edgelora adds two, each returning 32 ``uint8``:

- ``get_foundation_sha256``: the sha256 of the ``foundation.ptd`` the program needs;
- ``get_program_sha256``: the sha256 of the ``.pte`` itself with these 32 bytes zeroed.

Neither is known when a program is lowered (the foundation is written with the first program,
and a checksum cannot contain itself), so programs are serialised with fixed placeholders
(:func:`program_methods`) and :func:`stamp_program` writes the real values over them once the
foundation exists. :func:`verify_program` checks both, with our own parser, before ExecuTorch's
loader sees the file: the runtime aborts the whole process on some malformed programs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgelora.errors import InternalError, ProgramError
from edgelora.format.layout import sha256_file

# Constant methods ExecuTorch's LLM runner reads (TextLLMRunner, llama_main), in this order.
RUNNER_METADATA_METHODS = (
    "get_max_seq_len",
    "get_max_context_len",
    "get_vocab_size",
    "get_n_layers",
    "get_bos_id",
    "get_eos_ids",
    "use_kv_cache",
    "enable_dynamic_shape",
)
FOUNDATION_SHA_METHOD = "get_foundation_sha256"
PROGRAM_SHA_METHOD = "get_program_sha256"

_FOUNDATION_PLACEHOLDER = hashlib.sha256(b"edgelora: foundation sha256 placeholder").digest()
_PROGRAM_PLACEHOLDER = hashlib.sha256(b"edgelora: program sha256 placeholder").digest()


def program_methods(
    *, max_seq_len: int, vocab_size: int, n_layers: int, bos_id: int = 1, eos_ids=(2,)
) -> dict[str, object]:
    """Every constant method of our programs: the runner's metadata, then the two checksum
    placeholders (as ``uint8`` tensors) that :func:`stamp_program` fills in."""
    import torch

    meta: dict[str, object] = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": vocab_size,
        "get_n_layers": n_layers,
        "get_bos_id": bos_id,
        "get_eos_ids": list(eos_ids),
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    assert tuple(meta) == RUNNER_METADATA_METHODS
    for method, placeholder in (
        (FOUNDATION_SHA_METHOD, _FOUNDATION_PLACEHOLDER),
        (PROGRAM_SHA_METHOD, _PROGRAM_PLACEHOLDER),
    ):
        meta[method] = torch.frombuffer(bytearray(placeholder), dtype=torch.uint8)
    return meta


def stamp_program(pte: Path, foundation_sha: str) -> None:
    """Write the foundation's sha256, then the program's own checksum, over the placeholders
    in ``pte`` (each must occur exactly once: a constant tensor's bytes)."""
    data = pte.read_bytes()
    for placeholder in (_FOUNDATION_PLACEHOLDER, _PROGRAM_PLACEHOLDER):
        if data.count(placeholder) != 1:
            raise InternalError(
                f"{pte.name} holds a checksum placeholder {data.count(placeholder)} times, "
                "expected once"
            )
    data = data.replace(_FOUNDATION_PLACEHOLDER, bytes.fromhex(foundation_sha))
    own = hashlib.sha256(data.replace(_PROGRAM_PLACEHOLDER, bytes(32))).digest()
    pte.write_bytes(data.replace(_PROGRAM_PLACEHOLDER, own))


def restamp(data: bytes, offset: int) -> bytes:
    """``data`` (a stamped program whose bytes changed) with its own checksum, the 32 bytes at
    ``offset``, computed again."""
    out = bytearray(data)
    out[offset : offset + 32] = bytes(32)
    out[offset : offset + 32] = hashlib.sha256(out).digest()
    return bytes(out)


def _checksum_matches(pte: Path, own: bytes) -> bool:
    blob = pte.read_bytes()
    return blob.count(own) == 1 and hashlib.sha256(blob.replace(own, bytes(32))).digest() == own


def recorded_checksums(pte: Path) -> dict[str, object]:
    """What a program records about itself, read by our own parser (no runtime load):
    ``foundation_sha256`` and ``checksum_ok`` (``None`` where it has no such method)."""
    from edgelora.format.pte import read_pte

    constants = read_pte(pte).constants
    own, want = constants.get(PROGRAM_SHA_METHOD), constants.get(FOUNDATION_SHA_METHOD)
    return {
        "foundation_sha256": None if want is None else want.hex(),
        "checksum_ok": None if own is None else _checksum_matches(pte, own),
    }


def verify_program(pte: Path, data: Path | None, *, allow_unverified: bool = False) -> None:
    """Before a program runs: it must parse, match its own checksum and be paired with
    ``data`` of the foundation sha256 it was exported with. A program without the checksum
    methods (not an edgelora export, or one they were stripped from) is refused unless
    ``allow_unverified``. Raises :class:`ProgramError` naming the file (and both hashes for a
    wrong foundation)."""
    recorded = recorded_checksums(pte)
    if recorded["checksum_ok"] is False:
        raise ProgramError(f"{pte}: corrupt program (its checksum does not match its bytes)")
    want = recorded["foundation_sha256"]
    if want is None or recorded["checksum_ok"] is None:
        if allow_unverified:
            return
        raise ProgramError(
            f"{pte}: carries no edgelora checksums (not an edgelora export, or they were "
            "stripped), so its bytes and its foundation cannot be verified; pass "
            "--allow-unverified to run it anyway"
        )
    if data is None:
        raise ProgramError(
            f"{pte} needs its foundation data file (sha256 {want[:16]}...); pass --data "
            "foundation.ptd"
        )
    got = sha256_file(data)
    if got != want:
        raise ProgramError(
            f"{pte} was exported with a foundation of sha256 {want[:16]}..., but {data} has "
            f"sha256 {got[:16]}...: pass the foundation.ptd exported with this program"
        )
