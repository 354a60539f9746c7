"""A known-answer 3-D task end to end through the commands: volumes whose class is the half
(along W) holding a bright blob, trained by ``densenet train`` on NIfTI class folders, then
``eval`` on other volumes, ``predict`` and ``cam`` on ``.nii.gz`` files (the occlusion map is
highest over the blob; Grad-CAM's follows it across the other two axes) and ``export`` with a
5-D input."""

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


def test_occlusion_is_highest_over_the_blob(trained, capsys):
    """Covering the blob takes the class away: the occlusion map's maximum lies on the blob's
    brightest voxel to within 2 voxels along every axis (its default patch at 16^3 is 4 voxels,
    moved 2 at a time)."""
    files = sorted(trained["test"].glob("*/*.nii.gz"))
    out = trained["root"] / "occlusion"
    assert main(["cam", str(trained["run"]), *map(str, files), "--out", str(out),
                 "--method", "occlusion", "--size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    on_blob = []
    for path, line in zip(files, lines):
        shown, name, _, _, peak, png, nifti = line.split()
        assert shown == str(path) and name == path.parent.name  # the half with the blob
        peak = np.array([int(v) for v in peak.split(",")])
        on_blob.append(bool(np.all(np.abs(peak - _blob_centre(path)) <= 2)))
        assert png.endswith("_occlusion.png") and read_volume(nifti)[0].shape == (SIZE,) * 3
    assert sum(on_blob) >= 0.9 * len(files), on_blob


def test_grad_cam_follows_the_blob_across_the_axes_the_class_does_not_depend_on(trained, capsys):
    """Grad-CAM's map follows the blob along D and H to within one cell of the last block's
    4^3 maps. Along W, the axis that defines the class, it does not peak on the blob: every
    cell of those maps sees the whole 16^3 volume, and with global pooling the net reads the
    half from the blob's place relative to the border, so the maps that raise the class sit
    towards the middle (or the empty half) of W. Occlusion, above, asks the input itself."""
    files = sorted(trained["test"].glob("*/*.nii.gz"))
    out = trained["root"] / "cams"
    assert main(["cam", str(trained["run"]), *map(str, files), "--out", str(out)]) == 0
    capsys.readouterr()
    from densenet.cam import cam_for_volumes
    cams = cam_for_volumes(load_for_inference(str(trained["run"])), files, None)
    follows = []
    for path, cam in zip(files, cams):
        assert cam.cam.shape == (SIZE,) * 3 and cam.method == "gradcam"
        follows.append(bool(np.all(np.abs(np.array(cam.peak[:2]) - _blob_centre(path)[:2]) <= 4)))
    assert sum(follows) >= 0.8 * len(files), follows
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
