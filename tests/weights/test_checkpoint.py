import pytest
import torch

from edgelora.errors import CheckpointError
from edgelora.models.llama import build_model
from edgelora.weights.checkpoint import load_checkpoint
from edgelora.weights.tensor_files import save_checkpoint


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip(tiny_args, tmp_path, suffix):
    src = build_model(tiny_args, seed=1)
    path = save_checkpoint(src, tmp_path / f"m{suffix}")
    dst = load_checkpoint(build_model(tiny_args, seed=2), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickled_objects_are_refused(tiny_args, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    # An object whose unpickling calls a function: weights_only=True must refuse it.
    torch.save({"cfg": _RunsCodeWhenUnpickled(), "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(build_model(tiny_args), path)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_shape_and_key_errors(tiny_args, tmp_path):
    sd = build_model(tiny_args).state_dict()
    bad = dict(sd, **{"norm.weight": torch.ones(7)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"'norm.weight' has shape \[7\].*\[64\]"):
        load_checkpoint(build_model(tiny_args), tmp_path / "shape.pth")
    missing = {k: v for k, v in sd.items() if k != "output.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing 1 key.*output.weight"):
        load_checkpoint(build_model(tiny_args), tmp_path / "missing.pth")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_checkpoint(build_model(tiny_args), tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(build_model(tiny_args), tmp_path / "none.pth")
