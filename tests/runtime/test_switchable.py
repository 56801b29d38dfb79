"""Adapters as run-time inputs: ``switchable.pte`` (``export_llama --switchable``) is one
program for every adapter; ``AdapterSession`` switches by passing another adapter's tensors.

Tolerances: the switchable program computes the LoRA path with XNNPACK's fp32 batched matmul
where the separate programs use its fp32 linear, so sums are ordered differently (~1e-6); the
next layer's int8 dynamic activation quantization can turn such a difference into one
quantization step of an activation, so logits are compared within 1e-2 absolute on logits of
magnitude ~1 (measured below 2e-3) and the greedy tokens must be identical.
"""

from __future__ import annotations

import json

import pytest

from edgelora.errors import ProgramError
from edgelora.format.adapter_inputs import Slot, load_adapter_tensors
from edgelora.format.pte import missing_keys, read_pte
from edgelora.runtime.program import LlamaProgram
from edgelora.runtime.sessions import AdapterSession

PROMPT = [3, 9, 27, 4, 11]


def test_program_takes_inputs_in_the_compute_dtype(export_8da4w):
    """Whatever ``--adapter-dtype`` stores, ``switchable.pte`` takes fp32 adapter inputs (its
    compute dtype, recorded as the manifest's ``program_dtype``): a session converts an
    adapter's tensors once per switch, so no cast runs on every decode step."""
    from executorch.runtime import Runtime

    from edgelora.runtime.program import register_kernels

    register_kernels()  # the custom SDPA/KV-cache ops
    entry = json.loads((export_8da4w / "manifest.json").read_text())["switchable"]
    assert entry["program_dtype"] == "float32"
    program = Runtime.get().load_program(
        export_8da4w / entry["file"], data_path=export_8da4w / entry["foundation"]
    )
    meta = program.load_method("forward").metadata
    float32 = 6  # ExecuTorch's ScalarType::Float
    dtypes = {meta.input_tensor_meta(i).dtype() for i in range(2, meta.num_inputs())}
    assert meta.num_inputs() == 2 + 2 * len(entry["slots"]) and dtypes == {float32}


def test_switchable_matches_separate_programs(export_8da4w):
    manifest = json.loads((export_8da4w / "manifest.json").read_text())
    entry = manifest["switchable"]
    # chat adapts all seven projections at rank 4, code q/v at rank 8: q/v slots take rank 8.
    ranks = {s["module"].split(".", 2)[2]: s["rank"] for s in entry["slots"]}
    assert ranks == {
        "attention.wq": 8,
        "attention.wk": 4,
        "attention.wv": 8,
        "attention.wo": 4,
        "feed_forward.w1": 4,
        "feed_forward.w2": 4,
        "feed_forward.w3": 4,
    }
    # Every weight of the program is foundation: it holds no named data of its own (an
    # adapter program holds its LoRA matrices inline), and the foundation has all it needs.
    assert read_pte(export_8da4w / "chat.pte").inline
    assert read_pte(export_8da4w / "switchable.pte").inline == {}
    assert missing_keys(export_8da4w / "switchable.pte", export_8da4w / "foundation.ptd") == set()
    session = AdapterSession(export_8da4w)
    assert session.mode == "switchable" and session.adapters == ["chat", "code"]
    for name in ("chat", None, "code", "chat"):
        assert session.use_adapter(name) >= 0 and session.adapter == name
        got = session.program.forward(PROMPT, 0)
        separate = LlamaProgram(
            export_8da4w / f"{name or 'base'}.pte", export_8da4w / "foundation.ptd"
        )
        want = separate.forward(PROMPT, 0)
        assert (got - want).abs().max().item() < 1e-2, name
        assert session.generate(PROMPT, 6).tokens == separate.generate(PROMPT, 6).tokens, name
    # Adapters change the output (the inputs really reach the program).
    session.use_adapter("chat")
    chat = session.program.forward(PROMPT, 0)
    session.use_adapter(None)
    assert (chat - session.program.forward(PROMPT, 0)).abs().max().item() > 1e-2


def test_switchable_adapter_files_are_checked(export_8da4w, tmp_path):
    entry = json.loads((export_8da4w / "manifest.json").read_text())["switchable"]
    slots = [Slot.from_dict(d) for d in entry["slots"]]
    tensors = load_adapter_tensors(export_8da4w / entry["adapters"]["code"], slots)
    # code adapts q/v only: the other slots are zero; its rank 8 fills the q/v slots.
    for i, slot in enumerate(slots):
        adapted = slot.module.endswith(("wq", "wv"))
        for t in tensors[2 * i : 2 * i + 2]:
            assert (t.abs().sum() > 0) == adapted, slot.module
    bad_slots = [Slot(slots[0].module, slots[0].in_features, slots[0].out_features, 2)]
    with pytest.raises(Exception, match=r"has shape \[1, 64, 8\], the program's slot needs"):
        load_adapter_tensors(export_8da4w / entry["adapters"]["code"], bad_slots)
    session = AdapterSession(export_8da4w)
    with pytest.raises(ProgramError, match=r"no adapter 'nope' in this export"):
        session.use_adapter("nope")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 10)
    with pytest.raises(Exception, match="cannot read adapter tensors"):
        load_adapter_tensors(broken, slots)


@pytest.mark.parametrize("export, mode", [("8da4w", "switchable"), ("fused", "bundle")])
def test_a_switch_starts_a_new_sequence(request, export, mode):
    """Switching adapters mid-conversation: the next turn's logits are those of a fresh session
    with the new adapter -- the previous adapter's KV cache is not attended to. Continuing at
    the old position instead (what a reused cache would give) differs, so the check can fail."""
    import torch

    out = request.getfixturevalue(f"export_{export}")
    turn2 = [8, 21, 5]
    session = AdapterSession(out, mode)
    session.use_adapter("chat")
    session.append(PROMPT)
    assert session.position == len(PROMPT)
    session.use_adapter("code")
    assert session.position == 0
    got = session.append(turn2)
    fresh = AdapterSession(out, mode)
    fresh.use_adapter("code")
    assert torch.equal(got, fresh.append(turn2))
    stale = AdapterSession(out, mode)
    stale.use_adapter("chat")
    stale.append(PROMPT)
    stale.use_adapter("code")
    stale.position = len(PROMPT)  # as if the switch had kept the sequence
    assert (stale.append(turn2) - got).abs().max().item() > 1e-3
    # generate is a new sequence too, and leaves the position after what it fed
    gen = session.generate(PROMPT, 4)
    assert session.position == len(PROMPT) + len(gen.tokens) - 1
