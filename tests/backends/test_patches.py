"""``backends/xnnpack/patches.py``: every patch of ExecuTorch or PyTorch is active only inside
``lowering_patches`` (nothing stays patched after it, also after an error), and with versions
other than the pinned ones it warns and patches nothing but the partition counter."""

from __future__ import annotations

import warnings

import pytest
from torch.export import ExportedProgram

from edgelora.backends.xnnpack import patches


def _patched_objects() -> dict[str, object]:
    from executorch.backends.xnnpack import _passes
    from executorch.backends.xnnpack.operators import node_visitor
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    return {
        "pass manager": _passes.XNNPACKPassManager.__init__,
        "preprocess copy": XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess"),
        "run_decompositions": ExportedProgram.run_decompositions,
        "_to_copy visitor": node_visitor._node_visitor_dict.get(patches.TO_COPY),
    }


def test_every_patch_is_undone_on_exit_and_on_error():
    before = _patched_objects()
    with patches.lowering_patches(True, half_conversions=True):
        inside = _patched_objects()
    assert {k for k in before if inside[k] is not before[k]} == set(before)  # all four applied
    assert _patched_objects() == before
    with pytest.raises(RuntimeError), patches.lowering_patches(True, half_conversions=True):
        raise RuntimeError("a lowering failed")
    assert _patched_objects() == before


def test_other_versions_warn_and_lower_stock(monkeypatch):
    monkeypatch.setattr(patches, "PINNED", {"executorch": "0.0.1", "torch": "2.13.0"})
    monkeypatch.setattr(patches, "_warned", [])
    before = _patched_objects()
    with pytest.warns(UserWarning, match=r"executorch .* \(pinned 0\.0\.1\): lowering with"):
        with patches.lowering_patches(True) as counts:
            inside = _patched_objects()
    assert counts == {"partitions": 0, "skipped": 0}
    # only the partition counter (progress) is in place; nothing that changes the lowering
    assert [k for k in before if inside[k] is not before[k]] == ["pass manager"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        with patches.lowering_patches(True):
            pass


def test_the_pinned_versions_are_installed():
    assert patches.version_mismatches() == []
