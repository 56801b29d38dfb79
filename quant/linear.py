"""Weight quantization of linears with torchao: ``8da4w`` / ``8da8w`` / ``8w`` (the precisions
of :mod:`edgelora.quant.recipe`), one qmode per linear if a plan says so.

Int8 dynamic activations with int4 (or int8) grouped, symmetric weights, through torchao's
``Int8DynamicActivationIntxWeightConfig``: the form XNNPACK lowers to its dynamically
quantized fully-connected kernels. LoRA adapter matrices stay float: which modules they are is
read from the adapter wrappers attached to the model (:func:`edgelora.lora.attach.adapter_fqns`)
-- unless a program's adapter is asked for in int8 (weight-only: fp32 activations) or fp16
(:func:`store_adapter_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from edgelora.errors import ConfigError
from edgelora.lora.attach import adapter_fqns, attached

# How the weight scales are chosen: torchao's min/max ("affine") or its HQQ scale-only search
# (half-quadratic optimisation of the scales for the rounding error; the zero point stays 0,
# so XNNPACK's symmetric kernels run either).
from edgelora.quant.recipe import QMODES, QPARAMS  # noqa: E402
from edgelora.quant.rows import quantize_rows


@dataclass(frozen=True)
class LinearDecision:
    """Whether one linear is quantized, and if not, why."""

    fqn: str
    quantize: bool
    reason: str
    shape: tuple[int, int]


@dataclass
class QuantReport:
    """What a quantization pass changed and the weight error it introduced."""

    qmode: str
    group_size: int
    decisions: list[LinearDecision] = field(default_factory=list)
    # fqn -> (qmode, max |W - dequant(quant(W))| relative to max |W|) of every quantized linear
    tensors: dict[str, tuple[str, float]] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)  # fqn -> KLD alone at 4 bits
    calibration: object = None  # the quant.calibrate.Calibration, if the recipe calibrated
    max_abs_err: float = 0.0  # max |W - dequant(quant(W))| over the quantized linears
    max_rel_err: float = 0.0  # the same, relative to max |W| of that linear
    qparams: str = "affine"
    notes: list[str] = field(default_factory=list)  # e.g. a module quantized another way

    @property
    def quantized(self) -> list[LinearDecision]:
        return [d for d in self.decisions if d.quantize]

    @property
    def kept_float(self) -> list[LinearDecision]:
        return [d for d in self.decisions if not d.quantize]

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.qmode} g{self.group_size} ({self.qparams} qparams): "
            f"{len(self.quantized)} linears quantized, "
            f"{len(self.kept_float)} kept float; weight max abs err {self.max_abs_err:.3g} "
            f"(max rel {self.max_rel_err:.3g})"
        ]
        by_reason: dict[str, list[str]] = {}
        for d in self.kept_float:
            by_reason.setdefault(d.reason, []).append(d.fqn)
        for reason, fqns in sorted(by_reason.items()):
            shown = ", ".join(fqns[:6]) + (f", ... (+{len(fqns) - 6})" if len(fqns) > 6 else "")
            lines.append(f"  float ({reason}): {shown}")
        return lines + [f"  {note}" for note in self.notes]


def decide_linear(
    fqn: str, module: nn.Module, group_size: int, adapter_modules: frozenset[str] = frozenset()
) -> LinearDecision | None:
    """The filter's decision for one module, or ``None`` if it is not an ``nn.Linear``.

    ``adapter_modules`` are the FQNs of the attached adapters' modules (their ``lora_a`` /
    ``lora_b``), taken from the wrappers themselves, never from substrings of names: a base
    module that happens to contain "lora" in its name is still quantized.
    """
    if not isinstance(module, nn.Linear):
        return None
    shape = (module.out_features, module.in_features)
    if fqn in adapter_modules:
        return LinearDecision(fqn, False, "LoRA adapter matrix", shape)
    if type(module.weight) not in (torch.Tensor, nn.Parameter):  # a torchao tensor subclass
        return LinearDecision(fqn, False, "already quantized", shape)
    if group_size and module.in_features % group_size:
        return LinearDecision(
            fqn,
            False,
            f"in_features {module.in_features} not divisible by group size {group_size}",
            shape,
        )
    return LinearDecision(fqn, True, "quantized", shape)


def quantize_linears(
    model: nn.Module,
    qmode: str,
    group_size: int,
    *,
    prefix: str = "",
    report: QuantReport | None = None,
    qparams: str = "affine",
    plan: dict[str, str] | None = None,
    custom: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> QuantReport:
    """Quantize ``model``'s linears in place with torchao and report what changed.

    Args:
        qmode: ``"8da4w"`` (int4 weights), ``"8da8w"`` (int8 weights, int8 activations),
            ``"8w"`` (int8 weights, fp32 activations) or ``"none"``.
        group_size: 8da4w's weight group size along ``in_features``; 0 means one scale per
            output channel (8da8w and 8w always have one per channel).
        prefix: ``model``'s FQN when it is one part of a model (e.g. ``layers.3``), quantized
            part by part: the decisions name full FQNs.
        report: the report to add this part's decisions and errors to (a new one if None).
        qparams: ``"affine"`` (scales from each group's max |w|) or ``"hqq"`` (torchao's
            ``IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY``).
        plan: full FQN -> qmode for linears that take another qmode than ``qmode``.
        custom: full FQN -> ``(qdata, scale)`` of 8da4w linears quantized elsewhere (GPTQ).

    Returns a :class:`QuantReport` with every linear's decision and the max weight error.
    Raises :class:`ConfigError` for an unknown mode, qparams or a negative group size.
    """
    if qmode not in QMODES:
        raise ConfigError(f"qmode must be one of {QMODES}, got {qmode!r}")
    if qparams not in QPARAMS:
        raise ConfigError(f"qparams must be one of {QPARAMS}, got {qparams!r}")
    if not isinstance(group_size, int) or group_size < 0:
        raise ConfigError(f"group size must be an integer >= 0, got {group_size!r}")
    plan, custom = plan or {}, custom or {}
    report = QuantReport(qmode, group_size, qparams=qparams) if report is None else report
    decisions = {}
    adapters = adapter_fqns(model)
    for fqn, module in model.named_modules():
        full = ".".join(filter(None, (prefix, fqn)))
        mode = plan.get(full, qmode)
        decision = decide_linear(fqn, module, group_size if mode == "8da4w" else 0, adapters)
        if decision is not None:
            if mode == "none" and decision.quantize:
                decision = LinearDecision(fqn, False, "qmode none", decision.shape)
            decisions[fqn] = (decision, mode)
    report.decisions += [
        replace(d, fqn=".".join(filter(None, (prefix, d.fqn)))) for d, _ in decisions.values()
    ]
    with torch.no_grad():
        for fqn, (d, mode) in decisions.items():
            if not d.quantize:
                continue
            full = ".".join(filter(None, (prefix, fqn)))
            module = model.get_submodule(fqn)
            if mode == "8w" and module.bias is not None:
                # XNNPACK (ExecuTorch 1.5.1) cannot serialise a bias beside int8 weights
                # under fp32 activations: int8 activations then (backends/xnnpack/weight_only)
                mode = "8da8w"
            if full in custom:
                err, top = _custom_int4(module, *custom[full], group_size)
            else:
                config = _torchao_config(mode, group_size if mode == "8da4w" else 0, qparams)
                # a large weight a block of rows at a time (quant/rows.py)
                err, top = quantize_rows(module, lambda m, c=config: _quantize(m, c))
            report.max_abs_err = max(report.max_abs_err, err)
            report.max_rel_err = max(report.max_rel_err, err / max(top, 1e-12))
            report.tensors[full] = (mode, err / max(top, 1e-12))
    return report


def _quantize(module: nn.Module, config) -> None:
    from torchao.quantization import quantize_

    quantize_(module, config)


def _torchao_config(qmode: str, group_size: int, qparams: str):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    if qmode == "8w":  # weight-only int8 per channel: XNNPACK's F32-QC8W (backends/xnnpack)
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    algorithm = {
        "affine": IntxChooseQParamsAlgorithm.AFFINE,
        "hqq": IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY,
    }[qparams]
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if qmode == "8da4w" else torch.int8,
        weight_granularity=PerAxis(0)
        if group_size == 0 or qmode == "8da8w"
        else PerGroup(group_size),
        intx_choose_qparams_algorithm=algorithm
        if qmode == "8da4w"
        else IntxChooseQParamsAlgorithm.AFFINE,
    )


def _custom_int4(
    module: nn.Linear, qdata: torch.Tensor, scale: torch.Tensor, group_size: int
) -> tuple[float, float]:
    """``module``'s weight as the 8da4w tensor of ``qdata`` (int8 holding [-8, 7]) and
    ``scale`` ``[out, in / group_size]``; returns (max abs error, max |W|)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    original = module.weight.detach()
    dtype = original.dtype
    scale = scale.to(dtype)
    dequant = (qdata.float() * scale.float().repeat_interleave(group_size, 1)).to(dtype)
    q = IntxUnpackedToInt8Tensor.from_hp(
        dequant,
        (1, group_size),
        torch.int4,
        mapping_type=MappingType.SYMMETRIC,
        activation_quantization="int8_asym_per_token",
        intx_choose_qparams_algorithm=None,
        custom_scale=scale,
        custom_zero_point=torch.zeros_like(scale, dtype=torch.int8),
    )
    if not torch.equal(q.qdata, qdata.to(q.qdata.dtype)):
        raise RuntimeError(f"internal error: GPTQ weights of {tuple(qdata.shape)} re-round")
    err = (q.dequantize().float() - original.float()).abs().max().item()
    module.weight = nn.Parameter(q, requires_grad=False)
    return err, original.abs().max().item()


def _factors(model: nn.Module) -> list[tuple[nn.Linear, list[nn.Linear]]]:
    """Every ``lora_A`` layer of the attached adapters with the ``lora_B`` layers reading it."""
    return [f for wrapper in attached(model).values() for f in wrapper.factors()]


def quantize_adapter_weights(model: nn.Module) -> None:
    """The attached adapters' ``lora_A``/``lora_B`` as int8 weights under fp32 activations --
    XNNPACK's F32-QC8W linear (:mod:`edgelora.backends.xnnpack.weight_only`), a quarter of the
    fp32 bytes and no quantization of the activations (``--adapter-dtype int8`` for
    per-adapter programs), in place.

    QC8W takes one fp32 scale per output channel. ``lora_B``'s output channels are the
    projection's -- 23,552 per Llama-3.2-1B layer, 1.5 MB of scales for 11 MB of weights -- so
    ``lora_B`` is quantized per *rank component* instead and the scales move into ``lora_A``:
    with ``s_j = max|B[:, j]| / 127`` and ``c`` the largest ``s_j`` of the adapter,
    ``B A = (c Bq) (diag(s / c) A)`` where ``Bq = round(B diag(1/s))``. Every ``lora_B`` then
    has the same scale ``c`` on every channel, which XNNPACK stores once per output size (its
    constants are keyed by their bytes), and ``lora_A`` keeps one scale per rank component
    (``max|row| / 127``). The rounding is per rank column of ``B`` (at most half a step of
    ``max|B[:, j]| / 127``) and per row of ``A``; the activations stay fp32."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    def int8(layer: nn.Linear, w: torch.Tensor, scale: torch.Tensor) -> None:
        """``layer``'s weight: ``w`` (float32) as int8 with the per-row ``scale``."""
        dtype = layer.weight.dtype
        q = IntxUnpackedToInt8Tensor.from_hp(
            w.to(dtype),
            (1, w.shape[1]),
            torch.int8,
            mapping_type=MappingType.SYMMETRIC,
            activation_quantization=None,
            intx_choose_qparams_algorithm=None,
            custom_scale=scale.reshape(-1, 1).to(dtype),
            custom_zero_point=torch.zeros(w.shape[0], 1, dtype=torch.int8),
        )
        layer.weight = nn.Parameter(q, requires_grad=False)

    def positive(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m > 0, m / 127, torch.ones_like(m))  # an all-zero slice: scale 1

    with torch.no_grad():
        factors = _factors(model)
        # s_j for rank component j of each A: over column j of every B reading it
        s = [
            positive(torch.stack([b.weight.float().abs().amax(0) for b in bs]).amax(0))
            for _, bs in factors
        ]
        c = max((float(sj.max()) for sj in s), default=1.0)
        for (a, bs), sj in zip(factors, s, strict=True):
            for b in bs:  # Bq = round(B diag(c / s) / c)
                int8(b, b.weight.float() * (c / sj)[None, :], torch.full((b.out_features,), c))
            a_scaled = a.weight.float() * (sj / c)[:, None]
            int8(a, a_scaled, positive(a_scaled.abs().amax(1)))


def store_adapter_weights(model: nn.Module, adapter_dtype: str) -> bool:
    """The attached adapters' weights as a per-adapter program stores them, in place: each
    adapter's scale folded into its ``lora_B`` (no scaling op per projection), then
    ``"int8"`` (:func:`quantize_adapter_weights`), ``"fp16"`` (half the fp32 bytes; the
    wrapper converts its input to fp16 and the adapter's output back, conversions XNNPACK runs
    in the delegate, see :mod:`edgelora.backends.xnnpack.half`) or ``""``
    (fp32, or the model's dtype). Returns whether the adapters now convert between dtypes
    (fp16 adapters in an fp32 model)."""
    if adapter_dtype not in ("", "int8", "fp16"):
        raise ConfigError(
            f"adapter programs store fp32, fp16 or int8 weights, not {adapter_dtype!r}"
        )
    for wrapper in attached(model).values():
        wrapper.fold_scale()
    if adapter_dtype == "int8":
        quantize_adapter_weights(model)
    elif adapter_dtype == "fp16":
        layers = [layer for a, bs in _factors(model) for layer in (a, *bs)]
        converts = any(m.weight.dtype != torch.float16 for m in layers)
        for m in layers:
            m.to(torch.float16)
        return converts
    return False
