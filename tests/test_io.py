"""minift.io: atomic writes (a failed write leaves the old file and no temporary), JSON and
safetensors files that the reference readers (json, safetensors) read back exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

from minift.io import atomic_write, save_safetensors, write_json, write_text


def test_json_and_text_round_trip_and_replace(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": [1, 2.5], "nan": float("nan")})
    # the bytes json.dumps(indent=2) gives, plus a newline: nan as JavaScript's NaN
    assert path.read_text(encoding="utf-8") == '{\n  "x": [\n    1,\n    2.5\n  ],\n  "nan": NaN\n}\n'
    write_json(path, {"y": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"y": "é"}
    write_text(tmp_path / "t.txt", "line\n")
    assert (tmp_path / "t.txt").read_bytes() == b"line\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.txt"]   # no .tmp left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})

    def half_then_crash(tmp):
        tmp.write_text('{"step": 2', encoding="utf-8")   # cut short ...
        raise OSError("disk full")                        # ... by a failure
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(TypeError):   # not JSON: the old file stays too
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"step": 1}


def test_safetensors_round_trip_exactly_with_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, dtype=torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    save_safetensors(path, tensors, metadata={"format": "pt"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
