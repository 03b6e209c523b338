"""Saving and loading: round trips, and refusals of bad files with clear errors (never running code)."""

import json
import pickle

import pytest
import torch

from vaelab.errors import CheckpointError
from vaelab.models import build_model, from_pretrained
from vaelab.training.checkpoint import atomic_write_bytes


@pytest.fixture
def saved(tmp_path):
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    d = tmp_path / "run"
    model.save_pretrained(d)
    return model, d


def test_files_and_config(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["model"]["model"] == "vae" and cfg["model"]["latent_dim"] == 2
    assert cfg["model"]["input_shape"] == [1, 8, 8]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]


def test_truncated_weights_are_refused(saved):
    _, d = saved
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        from_pretrained(d)


def test_bit_flipped_header_is_refused(saved):
    _, d = saved
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[10] ^= 0xFF  # inside the JSON header
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        from_pretrained(d)


def test_a_pickle_in_place_of_the_weights_never_runs(saved, tmp_path):
    _, d = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        from_pretrained(d)
    assert not marker.exists()


def test_config_that_does_not_match_the_weights(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["latent_dim"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its model config.*shape mismatches"):
        from_pretrained(d)


def test_incompatible_format_version(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version=99.*reads version 1"):
        from_pretrained(d)


def test_missing_directory_and_invalid_json(tmp_path):
    with pytest.raises(CheckpointError, match="not a vaelab run or pretrained directory"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(tmp_path)


def test_nonfinite_weights_are_refused(saved):
    model, d = saved
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    model.save_pretrained(d)
    with pytest.raises(CheckpointError, match="non-finite"):
        from_pretrained(d)


def test_atomic_write_replaces_whole_files_and_reports_unwritable_places(tmp_path):
    from vaelab.errors import VaelabError

    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left behind
    with pytest.raises(VaelabError, match=r"cannot write .*f.bin/x.*writable"):
        atomic_write_bytes(target / "x", b"data")  # its 'directory' is a file
    assert target.read_bytes() == b"new"


def test_a_bit_flip_in_the_tensor_data_fails_the_checksum(saved):
    _, d = saved
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01  # the last tensor's bytes: still a valid float
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        from_pretrained(d)
