"""A known-answer 3-D task end to end through the commands: volumes whose class is the half
(along W) holding a bright blob, trained by ``densenet train`` on NIfTI class folders, then
``eval`` on other volumes, ``predict`` and ``cam`` on ``.nii.gz`` files (the map is highest
over the blob) and ``export`` with a 5-D input."""

import json

import numpy as np
import pytest
import torch

from densenet.cli import main
from densenet.inference import load_for_inference
from densenet.volumes import read_volume, synthetic_blobs

SIZE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    train_dir = synthetic_blobs(root / "train", n_per_class=24, size=SIZE, seed=0)
    test_dir = synthetic_blobs(root / "test", n_per_class=10, size=SIZE, seed=1)
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the task is tiny: one thread is the fastest on a shared machine
    try:
        # the volume recipe is the default for volume data; rotations would move the blob
        # from W to H, so this task trains without them
        code = main(["train", "--data", str(train_dir), "--model", "densenet_bc16_k8",
                     "--set", f"volume_size={SIZE}", "--set", "augment=false", "--epochs", "12",
                     "--lr", "3e-3", "--batch-size", "8", "--out", str(run), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return {"run": run, "train": train_dir, "test": test_dir, "root": root}


def test_training_on_nifti_class_folders_records_a_3d_model_and_its_volume_preprocessing(trained):
    config = json.loads((trained["run"] / "config.json").read_text())
    assert config["recipe"] == "volume"
    assert config["model_overrides"]["spatial_dims"] == 3
    assert config["model_overrides"]["in_channels"] == 1
    loaded = load_for_inference(str(trained["run"]))
    assert loaded.model.spatial_dims == 3
    assert loaded.pre.kind == "volume" and loaded.pre.shape == (SIZE,) * 3
    assert loaded.pre.intensity == "percentile" and loaded.pre.channels == 1
    assert loaded.classes == ["left", "right"]


def test_eval_on_unseen_volumes_is_accurate(trained, capsys):
    assert main(["eval", str(trained["run"]), "--data", str(trained["test"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "volumes" and result["n"] == 20
    assert result["single_crop"]["top1_error"] <= 0.1


def test_predict_names_the_half_with_the_blob(trained, capsys):
    files = sorted((trained["test"] / "left").glob("*.nii.gz"))[:3] + \
        sorted((trained["test"] / "right").glob("*.nii.gz"))[:3]
    assert main(["predict", str(trained["run"]), *map(str, files), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = [row["top"][0]["class"] for row in out]
    assert got == ["left"] * 3 + ["right"] * 3


def _blob_centre(path) -> np.ndarray:
    v = read_volume(path)[0]
    smooth = torch.nn.functional.avg_pool3d(torch.from_numpy(v)[None, None], 3, 1, 1)[0, 0]
    return np.array(np.unravel_index(int(smooth.argmax()), smooth.shape))


def test_cam_is_highest_over_the_blob(trained, capsys):
    files = sorted(trained["test"].glob("*/*.nii.gz"))
    out = trained["root"] / "cams"
    assert main(["cam", str(trained["run"]), *map(str, files), "--out", str(out)]) == 0
    capsys.readouterr()
    from densenet.cam import cam_for_volumes
    cams = cam_for_volumes(load_for_inference(str(trained["run"])), files, None)
    follows, hotter = [], []
    for path, cam in zip(files, cams):
        assert cam.cam.shape == (SIZE,) * 3
        centre = _blob_centre(path)
        # the map follows the blob along D and H, the axes the label does not depend on, to
        # within one cell of the last block's 4^3 map; and it is hotter at the blob than on
        # average. Along W, the axis that defines the class, a net with global pooling learns
        # the half from the blob's distance to the border, and this small one's map sits up
        # to a cell off the blob towards the middle.
        follows.append(bool(np.all(np.abs(np.array(cam.peak[:2]) - centre[:2]) <= 4)))
        hotter.append(float(cam.cam[tuple(centre)]) > float(cam.cam.mean()))
    assert sum(follows) >= 0.8 * len(files), follows
    assert sum(hotter) >= 0.7 * len(files), hotter
    assert len(list(out.glob("*_cam.png"))) == len(files)
    assert len(list(out.glob("*_cam.nii.gz"))) == len(files)


@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_export_takes_a_5d_input_and_matches(trained, fmt, capsys):
    suffix = {"onnx": "onnx", "exported-program": "pt2"}[fmt]
    out = trained["root"] / f"model.{suffix}"
    assert main(["export", str(trained["run"]), "--format", fmt, "--out", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    from densenet.export import load_exported
    run = load_exported(fmt, out)
    loaded = load_for_inference(str(trained["run"]))
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        want = loaded.model.set_implementation("reference")(x)
    torch.testing.assert_close(torch.as_tensor(run(x)).float(), want, rtol=1e-4, atol=1e-4)


def test_a_stopped_volume_run_resumes_to_the_same_weights(tmp_path, trained):
    """Order and augmentation (flips, pad-and-crop, rotations in a plane) come from the
    (seed, epoch) streams, so a run stopped mid-epoch and resumed ends where an uninterrupted
    one does."""
    from densenet.rundir import load_checkpoint
    from densenet.train import train
    kw = dict(epochs=2, batch_size=8, quiet=True, seed=3,
              set_fields={"volume_size": str(SIZE), "flip_axes": "0,1", "crop_pad": "2",
                          "rotate_plane": "0,1", "val_size": "8"})
    train("densenet_bc16_k4", None, str(trained["train"]), str(tmp_path / "whole"), **kw)
    train("densenet_bc16_k4", None, str(trained["train"]), str(tmp_path / "stopped"), max_steps=7, **kw)
    train(resume=str(tmp_path / "stopped"))
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "stopped"))
    assert a["model"]["overrides"]["spatial_dims"] == 3
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_a_csv_manifest_of_volumes_trains(tmp_path, trained):
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(trained["train"].glob("*/*.nii.gz"))]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    from densenet.train import train
    result = train("densenet_bc16_k4", None, str(manifest), str(tmp_path / "csv"), epochs=1,
                   batch_size=8, quiet=True, set_fields={"volume_size": "8", "val_size": "8"})
    assert result["dataset"] == "volumes" and result["epochs"] == 1
    loaded = load_for_inference(str(tmp_path / "csv"))
    assert loaded.pre.shape == (8, 8, 8) and loaded.classes == ["left", "right"]
