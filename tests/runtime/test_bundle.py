"""One process, one foundation, several adapters: ``bundle.pte`` (``export_llama --bundle``)
holds base and each adapter as methods, and ``AdapterSession`` switches between them.

Its methods must compute what the separate programs compute: logits within 1e-5 absolute (the
same kernels on the same weights; measured 0). Memory and switch latency are measured in
``bench/switch.py``, not asserted here.
"""

from __future__ import annotations

import pytest

from edgelora.errors import ProgramError
from edgelora.runtime.program import LlamaProgram
from edgelora.runtime.sessions import AdapterSession

PROMPT = [3, 9, 27, 4, 11]


def test_bundle_methods_equal_separate_programs(export_fused):
    session = AdapterSession(export_fused, mode="bundle")
    assert session.adapters == ["chat", "code"] and session.adapter is None
    bundle = (export_fused / "bundle.pte").stat().st_size
    programs = sum((export_fused / f"{n}.pte").stat().st_size for n in ("base", "chat", "code"))
    assert bundle < 1.1 * programs  # adapter weights once each, no foundation inside
    for name in ("chat", None, "code", "chat"):
        switch_s = session.use_adapter(name)
        assert session.adapter == name and switch_s >= 0
        session.program.forward(PROMPT, 0)  # fresh sequence for this method's cache
        got = session.program.forward(PROMPT, 0)
        separate = LlamaProgram(
            export_fused / f"{name or 'base'}.pte", export_fused / "foundation.ptd"
        ).forward(PROMPT, 0)
        assert (got - separate).abs().max().item() < 1e-5, name
    gen = session.generate(PROMPT, 4)
    assert len(gen.tokens) == 4


def test_bundle_errors(export_fused, export_fp32):
    session = AdapterSession(export_fused, mode="bundle")
    with pytest.raises(
        ProgramError, match=r"no adapter 'nope' in this export \(have: \['chat', 'code'\]\)"
    ):
        session.use_adapter("nope")
    with pytest.raises(ProgramError, match="re-export with --bundle"):
        AdapterSession(export_fp32, mode="bundle")
    with pytest.raises(ProgramError, match="no method 'x'"):
        LlamaProgram(export_fused / "base.pte", export_fused / "foundation.ptd", method="x")
