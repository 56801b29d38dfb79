import pytest
import torch
from torch import nn

from edgelora.errors import ConfigError
from edgelora.lora.attach import adapter_fqns
from edgelora.lora.modules import LoRALinear
from edgelora.models.llama import build_model
from edgelora.quant.linear import decide_linear, quantize_linears


class Odd(nn.Module):
    """Names chosen to catch substring matching: 'lora_ab' and 'flora_a' are not LoRA matrices."""

    def __init__(self):
        super().__init__()
        self.lora_ab = nn.Linear(64, 8, bias=False)
        self.flora_a = nn.Linear(64, 8, bias=False)
        self.narrow = nn.Linear(48, 8, bias=False)  # 48 % 32 != 0
        self.proj = LoRALinear(nn.Linear(64, 16, bias=False), rank=4, alpha=4)


def test_filter_decisions_use_fqn_components():
    m = Odd()
    adapters = adapter_fqns(m)
    decisions = {f: decide_linear(f, mod, 32, adapters) for f, mod in m.named_modules()}
    decisions = {f: d for f, d in decisions.items() if d is not None}
    assert decisions["lora_ab"].quantize and decisions["flora_a"].quantize
    assert decisions["proj.linear"].quantize
    assert (
        not decisions["proj.lora_a"].quantize
        and decisions["proj.lora_a"].reason == "LoRA adapter matrix"
    )
    assert not decisions["proj.lora_b"].quantize
    assert (
        not decisions["narrow"].quantize
        and "48 not divisible by group size 32" in decisions["narrow"].reason
    )
    assert decide_linear("narrow", m.narrow, 0).quantize  # per-channel: any in_features
    assert decide_linear("proj", m.proj, 32) is None  # the wrapper itself is not a linear


@pytest.mark.parametrize("qmode, levels", [("8da4w", 7), ("8da8w", 127)])
def test_quantize_reports_and_bounds_error(qmode, levels):
    m = Odd()
    torch.manual_seed(0)
    lora_a = m.proj.lora_a.weight.detach().clone()
    report = quantize_linears(m, qmode, 32)
    # int8 weights take one scale per output channel (XNNPACK has no grouped int8 kernel), so
    # 8da8w quantizes the 48-wide linear too
    grouped = qmode == "8da4w"
    want = ["flora_a", "lora_ab", *([] if grouped else ["narrow"]), "proj.linear"]
    assert sorted(d.fqn for d in report.quantized) == want
    assert {d.fqn: d.reason for d in report.kept_float} == {
        **({"narrow": "in_features 48 not divisible by group size 32"} if grouped else {}),
        "proj.lora_a": "LoRA adapter matrix",
        "proj.lora_b": "LoRA adapter matrix",
    }
    # Symmetric rounding: error <= half a step = max|w_group| / levels / 2.
    assert 0 < report.max_rel_err <= 0.5 / levels + 1e-6
    assert type(m.proj.linear.weight) not in (torch.Tensor, nn.Parameter)
    assert type(m.proj.lora_a.weight) is nn.Parameter and torch.equal(m.proj.lora_a.weight, lora_a)
    assert (type(m.narrow.weight) is nn.Parameter) == grouped
    text = "\n".join(report.summary_lines())
    if grouped:
        assert "3 linears quantized, 3 kept float" in text and "narrow" in text
    else:
        assert "4 linears quantized, 2 kept float" in text


def test_quantized_model_stays_close(tiny_args):
    ref, q = build_model(tiny_args, seed=0), build_model(tiny_args, seed=0)
    quantize_linears(q, "8da4w", 32)
    tokens = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        a, b = ref(tokens, torch.tensor([0])), q(tokens, torch.tensor([0]))
    # Int4 symmetric rounding noise has rms ~ step/sqrt(12) = max|w_group|/(7*sqrt(12)), about
    # 9% of a Gaussian weight's std for groups of 32; through one layer the logits' relative
    # rms error is about that (measured 0.092-0.098 over seeds 0-3). Bound: 0.15.
    rel = ((a - b).norm() / a.norm()).item()
    assert 0.0 < rel <= 0.15


def test_none_and_bad_modes():
    m = Odd()
    report = quantize_linears(m, "none", 32)
    assert not report.quantized and type(m.lora_ab.weight) is nn.Parameter
    with pytest.raises(ConfigError, match="qmode"):
        quantize_linears(m, "4bit", 32)
    with pytest.raises(ConfigError, match="group size"):
        quantize_linears(m, "8da4w", -1)


def test_hqq_qparams_lower_the_rms_weight_error():
    """HQQ scale-only searches each group's scale for the least rounding error: on Gaussian
    weights its RMS error is below the max-|w| (affine) scales' (measured: 0.089 vs 0.095), at
    the cost of a larger max error (clipped outliers)."""
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    rms = {}
    for qparams in ("affine", "hqq"):
        m = nn.Sequential(nn.Linear(256, 128, bias=False))
        m[0].weight.data = w.clone()
        report = quantize_linears(m, "8da4w", 32, qparams=qparams)
        assert report.qparams == qparams and f"({qparams} qparams)" in report.summary_lines()[0]
        rms[qparams] = float((m[0].weight.dequantize() - w).pow(2).mean().sqrt())
    assert rms["hqq"] < 0.97 * rms["affine"], rms
    with pytest.raises(ConfigError, match="qparams must be one of"):
        quantize_linears(nn.Sequential(nn.Linear(32, 8)), "8da4w", 32, qparams="gptq")


def test_output_bits_8_quantizes_the_output_layer_per_channel(tiny_args):
    from edgelora.export.config import FoundationSpec
    from edgelora.export.foundation import build_foundation

    spec = FoundationSpec.by_hand(qmode="8da4w", group_size=32, output_bits=8)
    model, report, _ = build_foundation(tiny_args, spec)
    out_w, layer_w = model.output.weight, model.layers[0].attention.wq.weight
    assert tuple(out_w.block_size) == (1, tiny_args.dim)  # one scale per output channel
    assert int(out_w.qdata.min()) < -8 or int(out_w.qdata.max()) > 7  # int8 levels, not int4
    assert tuple(layer_w.block_size) == (1, 32) and int(layer_w.qdata.abs().max()) <= 8
    assert any("output: 8da8w" in line for line in report.summary_lines())
