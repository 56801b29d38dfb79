"""Regression cases from fuzzing (``bench/fuzz.py``): each input it found that crashed a process
or escaped our errors, rebuilt here from a shared export, must be refused with one line.

- **An argument of the wrong kind** (fuzzing, ``pte`` target: ``aten::select_copy.int_out``'s
  ``int dim`` pointed at a Tensor value). The kernel read the Tensor as an int and the process
  died. Every kernel call's arguments are now checked against the operator's schema.
- **An out-of-range operator index** (fuzzing, ``pte`` target: one byte of a ``KernelCall``'s
  ``op_index``, 8 -> 553648136, with the checksum recomputed). Our parser accepted it and
  ExecuTorch's loader crashed the process running it. ``format/pte.py`` now checks every index
  of an execution plan and every planned tensor's bounds; the neighbouring cases below (a value,
  delegate or jump index out of range, a planned tensor past its buffer) are refused by the same
  checks.
- **A shard index whose weight map holds an object** (fuzzing, ``shard-index`` target):
  ``TypeError: unhashable type: 'dict'`` escaped ``open_checkpoint``. Every shard name is now
  checked (a string, a plain file name, not ``..``) before any is used.
- **A config.json whose ``architectures`` is a number** (fuzzing, ``config`` target):
  ``TypeError: 'int' object is not iterable`` escaped. ``architectures`` must be a list of
  names and ``model_type`` a string.
- **A mutated ``.pth``** (fuzzing, the CI smoke's ``pth`` target): ``torch.load`` raised
  ``AttributeError``/``IndexError`` that escaped. Any failure of ``torch.load`` is now one
  CheckpointError; every byte of a small checkpoint's pickle is varied below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.errors import ProgramError
from edgelora.format.checksums import PROGRAM_SHA_METHOD, restamp, verify_program
from edgelora.format.pte import read_pte


def _first(plan, kind):
    for chain in plan.chains:
        for ins in chain.instructions:
            if type(ins.instr_args).__name__ == kind:
                return ins.instr_args
    raise AssertionError(f"no {kind} in {plan.name}")


def _forward(pte):
    return next(p for p in pte.program.execution_plan if p.name == "forward")


def _planned(plan):
    return next(v.val for v in plan.values if getattr(v.val, "allocation_info", None) is not None)


def _int_argument_gets_a_tensor(pte) -> None:
    """The first kernel call taking (Tensor, int, ...) gets its tensor where the int goes."""
    plan = _forward(pte)
    for chain in plan.chains:
        for ins in chain.instructions:
            a = ins.instr_args
            kinds = [type(plan.values[i].val).__name__ for i in getattr(a, "args", [])[:2]]
            if type(a).__name__ == "KernelCall" and kinds == ["Tensor", "Int"]:
                a.args[1] = a.args[0]
                return
    raise AssertionError("no kernel call taking (Tensor, int)")


MUTATIONS = {
    # fuzzing: aten::select_copy.int_out's int dim pointing at a Tensor value crashed the process
    "argument-kind": (_int_argument_gets_a_tensor, "is a Tensor, not a Int"),
    "operator-index": (
        lambda pte: setattr(_first(_forward(pte), "KernelCall"), "op_index", 553648136),
        "operator index 553648136",
    ),
    "kernel-argument": (
        lambda pte: _first(_forward(pte), "KernelCall").args.__setitem__(0, 10**6),
        "kernel argument 1000000",
    ),
    "delegate-index": (
        lambda pte: setattr(_first(_forward(pte), "DelegateCall"), "delegate_index", 7),
        "delegate index 7",
    ),
    "planned-tensor-past-its-buffer": (
        lambda pte: _planned(_forward(pte)).sizes.__setitem__(0, 1 << 30),
        "past its buffer",
    ),
    "output-index": (lambda pte: _forward(pte).outputs.__setitem__(0, -1), "input/output -1"),
}


def _mutant(src: Path, dst: Path, mutate) -> Path:
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary

    pte = deserialize_pte_binary(src.read_bytes())
    mutate(pte)
    data = bytes(serialize_pte_binary(pte, extract_delegate_segments=True))
    own = read_pte(src).constants[PROGRAM_SHA_METHOD]
    assert data.count(own) == 1
    dst.write_bytes(restamp(data, data.index(own)))  # a valid checksum: only the parser stands
    return dst


def test_round_trip_is_accepted(export_8da4w, tmp_path):
    """(The mutants are made by ExecuTorch's own serializer; unmutated, it gives a program our
    checks accept.)"""
    same = _mutant(export_8da4w / "chat.pte", tmp_path / "same.pte", lambda pte: None)
    verify_program(same, export_8da4w / "foundation.ptd")


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_corrupt_plan_is_refused_before_the_loader(case, export_8da4w, tmp_path):
    mutate, message = MUTATIONS[case]
    bad = _mutant(export_8da4w / "chat.pte", tmp_path / f"{case}.pte", mutate)
    with pytest.raises(ProgramError, match="not a valid .pte program") as e:
        verify_program(bad, export_8da4w / "foundation.ptd")
    assert message in str(e.value)
    # the tool, in a process of its own (the loader would have crashed it): one line, exit 2
    proc = subprocess.run(
        [sys.executable, "-m", "edgelora.runtime.cli", str(bad), "--data"]
        + [str(export_8da4w / "foundation.ptd"), "--prompt-ids", "1,2", "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "shard", [{"a": 1}, ["x"], 7, None, "..", "", "../model.safetensors", "/etc/passwd"]
)
def test_bad_shard_names_in_an_index(shard, tmp_path):
    from edgelora.errors import CheckpointError
    from edgelora.weights.checkpoint import open_checkpoint

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="bad shard file name"):
        open_checkpoint(d)


@pytest.mark.parametrize(
    "change", [{"architectures": 5}, {"architectures": [1]}, {"model_type": ["llama"]}]
)
def test_config_architectures_of_the_wrong_type(change, tmp_path):
    from edgelora.errors import ConfigError
    from edgelora.weights.architectures import find_architecture

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **change}
    with pytest.raises(ConfigError, match="must be a"):
        find_architecture(cfg, "config.json")


def test_every_byte_of_a_pth_pickle_changed(tmp_path):
    """Fuzzing (``pth`` target, the CI smoke): ``torch.load(weights_only=True)`` of a mutated
    ``.pth`` raised ``AttributeError: 'tuple' object has no attribute 'dtype'``, which escaped.
    Here every byte of a small checkpoint's pickle is set to four values in turn: each file is
    read or refused with a CheckpointError, nothing else."""
    import torch

    from edgelora.errors import CheckpointError
    from edgelora.weights.tensor_files import read_state_dict

    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(2), "b": torch.ones(3, dtype=torch.float16)}, good)
    blob = good.read_bytes()
    start = blob.index(b"\x80\x02")  # the pickle (protocol 2) inside the zip
    end = blob.index(b".", start) + 1
    escaped = []
    bad = tmp_path / "bad.pth"
    for i in range(start, end):
        for value in (0x00, 0x30, 0x7F, 0xFF):
            b = bytearray(blob)
            b[i] = value
            bad.write_bytes(bytes(b))
            try:
                read_state_dict(bad)
            except CheckpointError:
                pass
            except Exception as e:  # noqa: BLE001 - what the test is for
                escaped.append((i - start, value, f"{type(e).__name__}: {e}"))
    assert not escaped, escaped[:5]
