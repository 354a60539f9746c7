"""The training system: run directories, the recipe reaching the optimizer, exact resume, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.rundir import load_checkpoint
from densenet.train import train

TINY = "densenet_bc16_k4"  # 2 bottleneck layers per block: fast enough for many epochs in a test


def make_folder_data(root: Path, classes=("cat", "dog", "frog"), per_class=12, size=32, seed=0):
    """A class-per-folder data set of small PNGs whose classes differ in colour (learnable)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            img[..., c % 3] += 150
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def folder_data(tmp_path):
    return make_folder_data(tmp_path / "data")


def run(tmp_path, folder_data, name, **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("batch_size", 8)
    kw.setdefault("set_fields", {"val_size": "6"})
    return train(TINY, "c10+", str(folder_data), str(tmp_path / name), quiet=True, seed=3, **kw)


def test_a_run_leaves_everything_in_its_directory(tmp_path, folder_data):
    result = run(tmp_path, folder_data, "run")
    d = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "split.json", "last.pt", "best.pt", "result.json",
              "train.log"):
        assert (d / f).is_file(), f
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"train_loss", "train_error", "val_loss", "val_error", "lr",
                            "images_per_s", "seconds"}
    saved = json.loads((d / "result.json").read_text())
    assert saved == result
    assert result["params"] == sum(p.numel() for p in __import__("densenet").create_model(TINY, num_classes=3).parameters())
    assert result["best_val_error"] == min(r["val_error"] for r in rows)
    assert result["test_error"] is None  # a folder without test/ has no test split
    config = json.loads((d / "config.json").read_text())
    assert config["model"] == TINY and config["recipe"] == "c10+" and config["epochs"] == 3
    ckpt = load_checkpoint(d / "best.pt")
    assert ckpt["classes"] == ["cat", "dog", "frog"]
    assert ckpt["preprocess"]["kind"] == "small" and len(ckpt["preprocess"]["mean"]) == 3



def test_pooled_buffers_are_freed_before_and_after_each_validation(tmp_path, folder_data, monkeypatch):
    # the efficient path keeps its large buffers for reuse at the same sizes; validation runs
    # at another batch size, so neither phase may find the other's buffers still held
    from densenet import train as train_mod
    from densenet.ops import buffers
    held = []
    real_eval, real_validate = train_mod.evaluate_batches, train_mod._Run._validate

    def evaluation(model, batches, *args, **kwargs):
        def checked():
            held.append(buffers.pooled_bytes())  # at the first batch: training buffers gone
            yield from batches
        return real_eval(model, checked(), *args, **kwargs)

    def validate(self, loader):
        out = real_validate(self, loader)
        held.append(buffers.pooled_bytes())  # back in training: so are the validation ones
        return out

    monkeypatch.setattr(train_mod, "evaluate_batches", evaluation)
    monkeypatch.setattr(train_mod._Run, "_validate", validate)
    monkeypatch.setattr(buffers, "POOL_MIN_BYTES", 1024)  # pool even this tiny model's buffers
    run(tmp_path, folder_data, "pool", epochs=2)
    assert held == [0, 0, 0, 0] and buffers.pooled_bytes() == 0


def test_recipe_settings_reach_the_optimizer(tmp_path, folder_data):
    run(tmp_path, folder_data, "run", epochs=4, lr=0.05)
    d = tmp_path / "run"
    lrs = [json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])  # /10 at 50% and 75% of 4 epochs
    group = load_checkpoint(d / "last.pt")["optimizer"]["param_groups"][0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-4 and group["dampening"] == 0


def test_holdout_is_recorded_and_deterministic(tmp_path, folder_data):
    run(tmp_path, folder_data, "a", epochs=1)
    run(tmp_path, folder_data, "b", epochs=1)
    a = json.loads((tmp_path / "a" / "split.json").read_text())
    b = json.loads((tmp_path / "b" / "split.json").read_text())
    assert a == b and len(a["val_indices"]) == 6 and a["seed"] == 3


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, folder_data):
    # dropout on, augmentation on: every source of randomness must be restored
    fields = {"val_size": "6", "drop_rate": "0.2"}
    run(tmp_path, folder_data, "full", set_fields=fields)
    run(tmp_path, folder_data, "cut", set_fields=fields, max_steps=5)  # stops mid-epoch 2
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step_in_epoch"] == 1
    train(resume=str(tmp_path / "cut"), quiet=True)
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert full["history"][-1]["val_loss"] == resumed["history"][-1]["val_loss"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_a_run_directory_is_not_overwritten(tmp_path, folder_data):
    run(tmp_path, folder_data, "run", epochs=1)
    with pytest.raises(ValueError, match="already holds a training run.*--resume"):
        run(tmp_path, folder_data, "run", epochs=1)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "densenet", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_missing_data_path_is_one_clear_paragraph(tmp_path):
    p = cli("train", "--recipe", "c10", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "nowhere" in p.stderr
    assert p.stderr.startswith("densenet: error:")
    assert not (tmp_path / "r").exists()


def test_cli_wrong_format_is_a_clear_error(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not images")
    p = cli("train", "--recipe", "c10", "--data", str(tmp_path / "junk"), "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "junk" in p.stderr


def test_cli_unknown_recipe_is_a_clear_error(tmp_path):
    p = cli("train", "--recipe", "c11", "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown recipe 'c11'" in p.stderr and "c10+" in p.stderr


def test_cli_recipes_show_prints_every_field():
    p = cli("recipes", "--show", "c10+")
    assert p.returncode == 0
    for field in ("epochs", "300", "nesterov", "weight_decay", "0.0001", "lr_milestones", "[150, 225]"):
        assert field in p.stdout


def test_cli_smoke_run_with_max_steps(tmp_path, folder_data):
    p = cli("train", "--model", TINY, "--recipe", "c10", "--data", str(folder_data), "--out",
            str(tmp_path / "r"), "--batch-size", "8", "--max-steps", "2", "--quiet",
            "--set", "val_size=6")
    assert p.returncode == 0, p.stderr
    assert "stopped after --max-steps 2" in p.stdout
    assert (tmp_path / "r" / "last.pt").is_file()
