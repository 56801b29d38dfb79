"""Text in, text out through ExecuTorch's own LLM runner (``TextLLMRunner``), the path an app
uses on the device: our programs carry the metadata methods it reads and the
``forward(tokens, input_pos)`` signature with a dynamic sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import ProgramError
from edgelora.format.checksums import verify_program
from edgelora.format.layout import BASE_PROGRAM
from edgelora.format.manifest import read_export
from edgelora.runtime.program import register_kernels


@dataclass
class TextGeneration:
    prompt: str
    pieces: list[str]  # decoded tokens as the runner streamed them
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def resolve_program(export_dir: str | Path, adapter: str | None) -> tuple[Path, Path]:
    """``(program, foundation)`` of ``adapter`` (or ``base``) in an export directory, by its
    manifest. Raises :class:`ProgramError` naming the programs it has."""
    export_dir = Path(export_dir)
    programs = read_export(export_dir).programs
    name = adapter or (BASE_PROGRAM if BASE_PROGRAM in programs else None)
    if name not in programs:
        raise ProgramError(
            f"{export_dir}: no program {adapter or 'base'!r} (have: {', '.join(sorted(programs))})"
        )
    entry = programs[name]
    return export_dir / entry.file, export_dir / entry.foundation


def shipped_tokenizer(export_dir: str | Path) -> Path:
    """The tokenizer an export directory ships (named in its manifest); :class:`ProgramError`
    if it has none."""
    export_dir = Path(export_dir)
    name = read_export(export_dir).tokenizer
    if name is None:
        raise ProgramError(
            f"{export_dir}: the export ships no tokenizer (export from a Hugging Face directory "
            "with tokenizer.json, or pass --tokenizer to export_llama or edgelora-run)"
        )
    return export_dir / name


def generate_text(
    pte: str | Path,
    tokenizer: str | Path,
    data: str | Path | None,
    prompt: str,
    max_new_tokens: int,
    *,
    allow_unverified: bool = False,
) -> TextGeneration:
    """Greedy generation (temperature 0) with ``TextLLMRunner``; no BOS is added."""
    register_kernels()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    for path, kind in ((pte, "program"), (tokenizer, "tokenizer"), (data, "data")):
        if path is not None and not Path(path).is_file():
            raise ProgramError(f"{path}: {kind} file not found")
    verify_program(
        Path(pte), None if data is None else Path(data), allow_unverified=allow_unverified
    )
    try:
        runner = TextLLMRunner(str(pte), str(tokenizer), None if data is None else str(data))
    except RuntimeError as e:
        raise ProgramError(f"cannot load {pte} with tokenizer {tokenizer}: {e}") from None
    pieces: list[str] = []
    stats = []
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, echo=False)
    try:
        runner.generate(prompt, config, token_callback=pieces.append, stats_callback=stats.append)
    except (RuntimeError, UnicodeDecodeError) as e:
        raise ProgramError(f"{pte}: generation failed: {e}") from None
    s = stats[-1]
    unit = s.SCALING_FACTOR_UNITS_PER_SECOND
    ttft = (s.first_token_ms - s.inference_start_ms) / unit
    decode_s = (s.inference_end_ms - s.first_token_ms) / unit
    rest = max(s.num_generated_tokens - 1, 0)
    return TextGeneration(
        prompt=prompt,
        pieces=pieces,
        prompt_tokens=s.num_prompt_tokens,
        generated_tokens=s.num_generated_tokens,
        time_to_first_token_s=ttft,
        decode_tokens_per_s=rest / decode_s if decode_s > 0 else float("inf"),
    )
