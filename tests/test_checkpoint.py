"""Checkpoints: atomic writes, checksums, and loading that never runs code from the file."""

import errno
import os
import pickle

import pytest
import torch

from densenet import create_model
from densenet.inference import load_model
from densenet.rundir import atomic_write_bytes, load_checkpoint, read_file, save_checkpoint


def payload(model_name="densenet_bc16_k4"):
    m = create_model(model_name, num_classes=3)
    return {"model": {"name": model_name, "overrides": {"num_classes": 3}},
            "state_dict": m.state_dict(), "classes": ["a", "b", "c"],
            "preprocess": {"kind": "small", "input_size": 32, "resize": None,
                           "mean": [0.5] * 3, "std": [0.25] * 3}, "epoch": 1}


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    p = payload()
    save_checkpoint(tmp_path / "best.pt", p)
    model, loaded = load_model(tmp_path)  # a run directory resolves to its best.pt
    assert loaded["classes"] == ["a", "b", "c"]
    for k, v in p["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": evil}, f)
    with pytest.raises(ValueError, match="refused to load"):
        read_file(tmp_path / "evil.pt")
    torch.save({"model": {"name": "x"}, "state_dict": evil}, tmp_path / "evil2.pt")
    with pytest.raises(ValueError, match="refused to load"):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    save_checkpoint(tmp_path / "last.pt", payload())
    envelope = torch.load(tmp_path / "last.pt", weights_only=True)
    data = bytearray(envelope["payload"])
    data[len(data) // 2] ^= 0xFF
    envelope["payload"] = bytes(data)
    torch.save(envelope, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="failed its checksum"):
        load_checkpoint(tmp_path / "last.pt")


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "last.pt", payload())
    raw = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        load_checkpoint(tmp_path / "last.pt")


def test_unknown_format_version_is_named(tmp_path):
    save_checkpoint(tmp_path / "last.pt", payload())
    envelope = torch.load(tmp_path / "last.pt", weights_only=True)
    envelope["format_version"] = 99
    torch.save(envelope, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(tmp_path / "last.pt")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "last.pt", payload())
    before = (tmp_path / "last.pt").read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path / "last.pt", {**payload(), "epoch": 2})
    assert e.value.errno == errno.ENOSPC
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"old")
    atomic_write_bytes(tmp_path / "f", b"new content")
    assert (tmp_path / "f").read_bytes() == b"new content"


def test_a_text_file_named_pt_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pt").write_text("hello world\n")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        load_checkpoint(tmp_path / "notes.pt")
