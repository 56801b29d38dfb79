"""Calibration: what a recipe measures on real text before it quantizes (``--calibration``).

1. **Text** (:func:`calibration_ids`): a UTF-8 file of the user's, one passage per line, or by
   default prose that every Python installs -- paragraphs of the Python Language Reference
   (``pydoc_data.topics``, PSF-2.0), the topics whose name hashes odd (``bench/quality.py``
   scores on the even ones). Encoded with the export's tokenizer, cut into chunks.
2. **Second moments** (:func:`layer_moments`): ``H = sum x x^T`` of every linear's inputs over
   the chunks, from the float model (GPTQ's ``H``, :mod:`edgelora.quant.gptq`), a layer at a
   time: the model is run once recording each layer's input (:class:`_Probe`), then only that
   layer is re-run, so one layer's moments are in memory at a time.
3. **Sensitivity** (:func:`sensitivity`): for each linear alone, the mean KL divergence of the
   model's next-token distribution when that linear takes its 4-bit weights (the GPTQ ones,
   as they will ship) against the float model -- measured, one tensor at a time, not guessed
   from names -- run from the linear's layer on. On up to 256 tokens, fewer for large models
   (a compute budget, :func:`sensitivity_tokens`).
4. **Plan** (:func:`upgrade_plan`): the linears with the highest divergence per byte that int8
   would add are given int8 until the recipe's share of the linear weights is reached.

Deterministic: the same model, text and recipe give the same plan and the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import ConfigError

CHUNK = 256  # tokens per calibration sequence
MAX_TOKENS = 1024  # calibration tokens read (moments)
SENSITIVITY_TOKENS = 256  # of which the per-tensor divergence is measured on, at most
SENSITIVITY_FLOPS = 8e12  # compute the per-tensor divergence may take (fewer tokens beyond)


def default_calibration_text() -> str:
    """Paragraphs of prose from ``pydoc_data.topics`` whose topic name hashes odd, one per
    line (blocks of at least 200 characters that are not indented code)."""
    return "\n".join(p for p, even in _topic_paragraphs() if not even) + "\n"


def held_out_text() -> list[str]:
    """The other paragraphs (topic names hashing even): never calibrated on."""
    return [p for p, even in _topic_paragraphs() if even]


def _topic_paragraphs() -> list[tuple[str, bool]]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        even = hashlib.sha256(name.encode()).digest()[0] % 2 == 0
        for block in topics[name].split("\n\n"):
            lines = block.strip("\n").splitlines()
            if not lines or any(line.startswith("   ") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) < 200 or "****" in text or "====" in text:
                continue
            out.append((text, even))
    return out


@dataclass(frozen=True)
class Calibration:
    source: str  # the file, or "builtin:pydoc_data.topics"
    sha256: str  # of the text
    chunks: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.chunks))


def calibration_ids(
    path: Path | None,
    tokenizer: Path | None,
    vocab_size: int,
    *,
    chunk: int = CHUNK,
    max_tokens: int = MAX_TOKENS,
) -> Calibration:
    """The calibration text of ``path`` (``None``: the built-in prose) as token chunks of at
    most ``chunk`` ids, ``max_tokens`` in all. With no ``tokenizer`` (a ``tokenizer.json``:
    e.g. a Meta checkpoint, or random weights) and no ``path``, :func:`random_calibration`.
    :class:`ConfigError` if the file is unreadable or empty, or cannot be encoded."""
    if path is None:
        text, source = default_calibration_text(), "builtin:pydoc_data.topics"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--calibration {path}: unreadable ({e})") from None
        source = str(path)
    if tokenizer is None:
        if path is not None:
            raise ConfigError(
                f"--calibration {path}: the export has no tokenizer.json to encode it with "
                "(give --tokenizer)"
            )
        return random_calibration(vocab_size, chunk=chunk, max_tokens=max_tokens)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    ids: list[int] = []
    for line in text.splitlines():
        if line.strip():
            ids += tok.encode(line.strip() + "\n").ids
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"--calibration {source}: no text to calibrate on")
    chunks = tuple(tuple(ids[i : i + chunk]) for i in range(0, len(ids), chunk))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Calibration(source, digest, tuple(c for c in chunks if len(c) >= 2))


def random_calibration(vocab_size: int, *, chunk: int = CHUNK, max_tokens: int = MAX_TOKENS):
    """Pseudo-random token ids (seed 0): what a calibrating recipe measures on when there is
    no tokenizer to encode text with. Deterministic; far from real text, so the export log
    says so."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (max_tokens,), generator=g).tolist()
    chunks = tuple(tuple(ids[i : i + chunk]) for i in range(0, len(ids), chunk))
    digest = hashlib.sha256(repr(ids).encode()).hexdigest()
    return Calibration("random token ids (no tokenizer.json)", digest, chunks)


def _forward(model: nn.Module, chunk: tuple[int, ...]) -> torch.Tensor:
    """Float32 log-probabilities ``[len(chunk), vocab]`` of ``model`` on ``chunk`` from 0."""
    logits_mode = getattr(model, "logits", "all")
    model.logits = "all"
    try:
        out = model(torch.tensor([chunk]), torch.tensor([0]))
    finally:
        model.logits = logits_mode
    return out[0].float().log_softmax(-1)


class _Stop(Exception):
    """Raised after the layer a probe runs, to end the model's forward there."""


class _Skip(nn.Module):
    """A layer that passes its input through: the layers before the one probed (with the
    skipped layer's attributes, e.g. its ``kind``, which the model's loop reads)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.kind = getattr(layer, "kind", None)

    def forward(self, x, *args, **kwargs):
        return x


class _Probe:
    """The float model run once on the calibration chunks, recording the input of each of its
    ``layers``; then any one layer, or the model from one layer on, re-run from those inputs:
    a linear inside ``layers.L`` changes nothing before that layer, so nothing before it is
    run again. ``sensitivity_tokens`` of the first chunks keep the float model's
    log-probabilities to measure divergence against."""

    def __init__(self, model: nn.Module, calibration: Calibration, sensitivity_tokens: int):
        self.model, self.layers = model, getattr(model, "layers", None)
        self.chunks, n = list(calibration.chunks), 0
        self.scored: list[tuple[int, ...]] = []  # the sensitivity chunks (prefixes)
        for chunk in self.chunks:
            if n >= sensitivity_tokens:
                break
            self.scored.append(chunk[: sensitivity_tokens - n])
            n += len(self.scored[-1])
        self.scored_tokens = n
        self.hidden: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []

        def record(module, args):
            current.append(args[0].detach().clone())

        hooks = [layer.register_forward_pre_hook(record) for layer in (self.layers or [])]
        try:
            for chunk in self.chunks:
                current = []
                _forward(self.model, chunk)
                self.hidden.append(current)
            self.scored_hidden = []
            self.reference = []
            for chunk in self.scored:
                current = []
                self.reference.append(_forward(self.model, chunk))
                self.scored_hidden.append(current)
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def _from(self, index: int, start: torch.Tensor):
        """The model's forward starts at layer ``index`` with input ``start``."""
        layers = self.layers
        skipped = [layers[i] for i in range(index)]
        for i in range(index):
            layers[i] = _Skip(skipped[i])
        hook = layers[index].register_forward_pre_hook(lambda m, args: (start, *args[1:]))
        try:
            yield
        finally:
            hook.remove()
            for i, layer in enumerate(skipped):
                layers[i] = layer

    def run_layer(self, index: int | None) -> None:
        """Run layer ``index`` alone on every chunk (the whole model if ``None``), for the
        hooks on its modules."""
        for i, chunk in enumerate(self.chunks):
            if index is None:
                _forward(self.model, chunk)
                continue
            stop = self.layers[index].register_forward_hook(_raise_stop)
            try:
                with self._from(index, self.hidden[i][index]):
                    _forward(self.model, chunk)
            except _Stop:
                pass
            finally:
                stop.remove()

    def divergence(self, index: int | None) -> float:
        """Mean KL(float || the model as it is now) per token on the scored chunks, run from
        layer ``index`` on (the whole model if ``None``)."""
        total = 0.0
        for i, (r, chunk) in enumerate(zip(self.reference, self.scored, strict=True)):
            if index is None:
                got = _forward(self.model, chunk)
            else:
                with self._from(index, self.scored_hidden[i][index]):
                    got = _forward(self.model, chunk)
            total += float((r.exp() * (r - got)).sum())
        return total / self.scored_tokens


def _raise_stop(module, args, output):
    raise _Stop


@torch.no_grad()
def layer_moments(probe: _Probe, index: int | None, fqns: list[str]) -> dict[str, torch.Tensor]:
    """``fqn -> sum x x^T`` (float64 ``[in, in]``) of the inputs of the linears ``fqns`` (all
    in layer ``index``) over the calibration chunks; linears that read the same tensor (q/k/v,
    gate/up) share one."""
    sums: dict[str, torch.Tensor] = {}
    reader: dict[str, str] = {}  # fqn -> the first linear that read its input
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # per forward; holds the inputs alive

    def hook(fqn):
        def record(module, args):
            x = args[0]
            first = seen.setdefault(id(x), (x, fqn))[1]
            reader[fqn] = first
            if first == fqn:
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                sums[fqn] = sums.get(fqn, 0) + flat.T @ flat
            if fqn == fqns[-1]:
                seen.clear()

        return record

    hooks = [probe.model.get_submodule(f).register_forward_pre_hook(hook(f)) for f in fqns]
    try:
        probe.run_layer(index)
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    return {f: sums[reader[f]] for f in fqns}


def sensitivity_tokens(model: nn.Module, candidates: int) -> int:
    """How many tokens the per-tensor divergence is measured on: :data:`SENSITIVITY_TOKENS`
    (256) while that costs at most :data:`SENSITIVITY_FLOPS`, fewer for larger models (at
    least 32): one forward of the layers from each candidate's on, per token."""
    params = sum(p.numel() for p in model.parameters())
    per_token = 2 * params * max(candidates, 1) / 2  # half the layers on average
    return int(min(SENSITIVITY_TOKENS, max(32, SENSITIVITY_FLOPS // per_token)))


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    calibration: Calibration,
    quantized: dict[str, torch.Tensor],
    *,
    tokens: int = SENSITIVITY_TOKENS,
    progress: Callable | None = None,
) -> dict[str, float]:
    """``fqn -> mean KL(float || this linear alone with weight quantized[fqn])`` per token on
    the first ``tokens`` calibration tokens (each run from the linear's layer on)."""
    probe = _Probe(model, calibration, tokens)
    out = {}
    items = list(quantized.items())
    for fqn, weight in progress(items) if progress else items:
        out[fqn] = _divergence_with(probe, fqn, weight)
    return out


def _divergence_with(probe: _Probe, fqn: str, weight: torch.Tensor) -> float:
    module = probe.model.get_submodule(fqn)
    original = module.weight.data
    module.weight.data = weight.to(original.dtype)
    try:
        return probe.divergence(_layer_index(fqn) if probe.layers is not None else None)
    finally:
        module.weight.data = original


def _layer_index(fqn: str) -> int | None:
    parts = fqn.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


def upgrade_plan(
    kld: dict[str, float], sizes: dict[str, int], share: float, *, extra_bits: float = 3.5
) -> list[str]:
    """The linears to give int8: in order of KL divergence per byte int8 adds over int4
    (``extra_bits`` per weight), until ``share`` of the weights of all ``sizes`` (fqn ->
    number of weights) are chosen. Ties break by name, so the plan is deterministic."""
    total = sum(sizes.values())
    order = sorted(kld, key=lambda f: (-kld[f] / (sizes[f] * extra_bits), f))
    chosen, weights = [], 0
    for fqn in order:
        if weights + sizes[fqn] > share * total + 0.5 * sizes[fqn]:
            continue
        chosen.append(fqn)
        weights += sizes[fqn]
    return chosen


@dataclass
class CalibrationResult:
    plan: dict[str, str]  # fqn -> qmode of the upgraded linears
    custom: dict[str, tuple[torch.Tensor, torch.Tensor]]  # fqn -> GPTQ (qdata, scale)
    sensitivity: dict[str, float]  # fqn -> mean KLD with that linear alone at 4 bits
    calibration: Calibration


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    calibration: Calibration,
    *,
    group_size: int,
    gptq: bool,
    upgrade: float,
    upgrade_qmode: str,
    qparams: str,
    exclude: frozenset[str] = frozenset(),
    progress: Callable | None = None,
) -> CalibrationResult:
    """Measure ``model`` (float) on ``calibration`` and decide how each of its 8da4w linears
    is stored: GPTQ's ``(qdata, scale)`` (``gptq``) and which linears get ``upgrade_qmode``
    (the most sensitive ``upgrade`` share of the weights; see the module docstring).
    ``exclude``: linears that are not 8da4w candidates (the output layer, adapters).

    A layer at a time: its linears' input moments (only that layer is re-run, from its
    recorded input), GPTQ, then each linear's divergence; one layer's moments exist at a
    time, and the weights stay float until the export quantizes them."""
    from edgelora.quant.gptq import gptq_int4

    fqns = [
        f
        for f, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and f not in exclude
        and type(m.weight) in (torch.Tensor, nn.Parameter)
        and not (group_size and m.in_features % group_size)
    ]
    layered = getattr(model, "layers", None) is not None
    by_layer: dict[int | None, list[str]] = {}
    for f in fqns:
        by_layer.setdefault(_layer_index(f) if layered else None, []).append(f)
    wrap = progress or (lambda it, *a, **k: it)
    tokens = sensitivity_tokens(model, len(fqns)) if upgrade > 0 else 0
    probe = _Probe(model, calibration, tokens)
    custom, kld = {}, {}
    for index, group in wrap(list(by_layer.items()), "calibrate"):
        moments = layer_moments(probe, index, group) if gptq else {}
        for fqn in group:
            weight = model.get_submodule(fqn).weight.detach().float()
            if gptq:
                qdata, scale = gptq_int4(weight, moments.pop(fqn), group_size)
                custom[fqn] = (qdata, scale)
                quantized = qdata.float() * scale.repeat_interleave(group_size, 1)
            else:
                quantized = _fake_int4(weight, group_size, qparams)
            if upgrade > 0:
                kld[fqn] = _divergence_with(probe, fqn, quantized)
        del moments
    sizes = {f: model.get_submodule(f).weight.numel() for f in fqns}
    chosen = upgrade_plan(kld, sizes, upgrade) if upgrade > 0 else []
    for fqn in chosen:
        custom.pop(fqn, None)
    return CalibrationResult({f: upgrade_qmode for f in chosen}, custom, kld, calibration)


def _fake_int4(weight: torch.Tensor, group_size: int, qparams: str) -> torch.Tensor:
    """``weight`` through torchao's 8da4w quantization and back (the float it will act as)."""
    from edgelora.quant.linear import quantize_linears

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    holder = nn.Sequential(layer)
    quantize_linears(holder, "8da4w", group_size, qparams=qparams)
    return holder[0].weight.dequantize().float()
