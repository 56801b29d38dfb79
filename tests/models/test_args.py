import json

import pytest

from edgelora.errors import ConfigError
from edgelora.models.args import ModelArgs


def test_hidden_dim_follows_meta_rule():
    # stories15M: 4*288 -> 2/3 -> 768, already a multiple of 32.
    assert ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000).ffn_hidden_dim == 768
    # Llama 3.2 1B: int(2*8192/3)=5461, *1.5 -> 8191, rounded up to a multiple of 256 -> 8192.
    args = ModelArgs(dim=2048, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256)
    assert args.ffn_hidden_dim == 8192
    assert ModelArgs(dim=64, hidden_dim=100).ffn_hidden_dim == 100


def test_from_json_with_override(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 10}))
    args = ModelArgs.from_json(path, max_seq_len=16)
    assert (args.dim, args.kv_heads, args.head_dim, args.max_seq_len) == (64, 4, 16, 16)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"dim": 64, "n_heads": 5}, "n_heads"),
        ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 0}, "dim"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"n_layers": "2"}, "n_layers"),
        ({"dim": 64, "n_heads": 4, "bogus": 1}, "bogus"),
    ],
)
def test_invalid_params_name_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_dict(params)


def test_unreadable_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelArgs.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        ModelArgs.from_json(bad)
