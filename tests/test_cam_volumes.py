"""Grad-CAM of 3-D (and 1-D) DenseNets: the map against a direct computation with hooks and
autograd, a known answer on a hand-built volume network, the PNG of three slices through the
map's maximum and the NIfTI heat map, and the ``densenet cam`` command's routing and errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densenet import create_model
from densenet.cam import (CAPTION_HEIGHT, VolumeCAM, cam_for_images, cam_for_volumes, grad_cam,
                          last_block, occlusion, render_slices, slices_through)
from densenet.cli import main
from densenet.errors import UsageError
from densenet.inference import Loaded, open_volume
from densenet.model import densenet_cifar
from densenet.preprocess import Preprocess
from densenet.rundir import save_checkpoint
from densenet.volumes import read_volume, write_nifti

import nibabel as nib  # noqa: E402  (the test extra installs it)

CLASSES = ["dark", "bright"]
SHAPE = (12, 16, 8)  # (D, H, W): no two sizes alike, so a swapped axis shows
# the bright box, in model-input voxels: one voxel of the last block's maps (4x coarser)
BLOB = (slice(4, 8), slice(8, 12), slice(4, 8))
OVERRIDES = {"num_classes": 2, "spatial_dims": 3, "in_channels": 1}


def bright_detector():
    """A 3-D DenseNet-BC (L=10, k=4) whose "bright" logit is the mean of the positive part of
    the (z-scored) volume, pooled twice: the 3-D twin of test_cam's red detector.

    conv0 copies the volume into map 0, every BN is the identity, the dense layers add zero maps
    and the transitions pass map 0 on (their ReLU zeroes the background, negative after the
    z-score); the classifier reads map 0 with weight +32 ("bright") and -32 ("dark")."""
    model = create_model("densenet_bc10_k4", **OVERRIDES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.zero_()
            elif isinstance(m, torch.nn.BatchNorm3d):
                m.weight.fill_(1.0), m.bias.zero_()
                m.running_mean.zero_(), m.running_var.fill_(1.0)
        model.features.conv0.weight[0, 0, 1, 1, 1] = 1.0
        model.features.transition1.conv.weight[0, 0] = 1.0
        model.features.transition2.conv.weight[0, 0] = 1.0
        model.classifier.weight.zero_(), model.classifier.bias.zero_()
        model.classifier.weight[1, 0], model.classifier.weight[0, 0] = 32.0, -32.0
    return model.eval()


def blob_volume(shape=SHAPE, box=BLOB):
    a = np.zeros(shape, np.float32)
    a[box] = 1.0
    return a


def inside(box=BLOB, shape=SHAPE):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[box] = True
    return mask


def loaded_model(model=None, task="single-label", thresholds=None, source="bright.pt"):
    return Loaded(model if model is not None else bright_detector(), "densenet_bc10_k4", source,
                  list(CLASSES), Preprocess.volume(SHAPE, "zscore", 1), thresholds=thresholds,
                  task=task)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("volumes")
    write_nifti(d / "blob.nii.gz", blob_volume())
    np.save(d / "blob.npy", blob_volume())
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cam3d") / "bright.pt"
    save_checkpoint(path, {"model": {"name": "densenet_bc10_k4", "overrides": OVERRIDES},
                           "state_dict": bright_detector().state_dict(), "classes": CLASSES,
                           "preprocess": Preprocess.volume(SHAPE, "zscore", 1).to_dict()})
    return path


# ----------------------------------------------------------------------------- the maps

def measured_model(spatial_dims, size):
    """A random DenseNet-BC of ``spatial_dims`` with BN statistics of real batches."""
    torch.manual_seed(0)
    model = densenet_cifar(10, growth_rate=4, spatial_dims=spatial_dims, in_channels=2,
                           num_classes=3)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 2, *size))
    return model.eval()


def direct_grad_cam(model, x, classes):
    """Grad-CAM written out: the last block's output kept by a hook, d logit / d A by autograd
    through the whole (reference) network, alpha its mean over every spatial position."""
    kept = []
    handle = last_block(model).register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        x = x.clone().requires_grad_(True)
        logits = model.set_implementation("reference")(x)
    finally:
        handle.remove()
    a = kept[0]
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), classes].sum(), a)
    spatial = tuple(range(2, a.dim()))
    cam = F.relu((grad.mean(dim=spatial, keepdim=True) * a).sum(1, keepdim=True))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    cam = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[:, 0].detach()
    peak = cam.reshape(len(x), -1).amax(1).reshape(-1, *[1] * (cam.dim() - 1))
    return cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), logits.detach().softmax(1)


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
@pytest.mark.parametrize("size", [(9, 12, 10), (21,)], ids=["3d", "1d"])
def test_the_map_equals_a_direct_hook_and_autograd_computation(size, implementation):
    model = measured_model(len(size), size)
    x = torch.randn(3, 2, *size, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2, 1])
    expected, probs = direct_grad_cam(model, x, classes)
    result = grad_cam(model.set_implementation(implementation), x, classes)
    assert result.cams.shape == (3, *size)  # the input's spatial size
    assert torch.equal(result.classes, classes)
    peaks = result.cams.reshape(3, -1).amax(1)
    assert result.cams.min() >= 0 and torch.all((peaks == 1.0) | (peaks == 0.0))
    assert (peaks == 1.0).sum() >= 2  # not a test of all-zero maps only
    torch.testing.assert_close(result.cams, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.probs, probs, rtol=0, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_the_map_of_a_volume_is_on_the_blob_that_decides_the_class(implementation):
    model = bright_detector().set_implementation(implementation)
    x = torch.from_numpy(blob_volume())
    x = ((x - x.mean()) / x.std(correction=0))[None, None]
    cams, probs, classes = grad_cam(model, x)
    assert classes.tolist() == [1] and probs[0, 1] > 0.95
    cam, mask = cams[0], inside()
    assert cam.shape == SHAPE and cam.max() == 1.0
    assert mask.flatten()[cam.argmax()]
    assert cam[mask].mean() > 5 * cam[~mask].mean()
    assert torch.all(grad_cam(model, x, target=0).cams == 0)  # "dark": no positive evidence


def test_occlusion_is_positive_exactly_on_the_blob_that_decides_the_class():
    """Patches of 2 voxels tile the volume and the blob's edges: covering a blob patch with
    the volume's mean (0 after the z-score) takes its voxels out of the "bright" mean; covering
    background changes nothing (the ReLU zeroes it either way)."""
    x = torch.from_numpy(blob_volume())
    x = ((x - x.mean()) / x.std(correction=0))[None, None]
    result = occlusion(bright_detector(), x, patch=2, stride=2)
    assert result.classes.tolist() == [1] and result.probs[0, 1] > 0.95
    assert torch.equal(result.cams[0] > 0, inside()) and result.cams.max() == 1.0
    assert torch.all(occlusion(bright_detector(), x, target=0, patch=2).cams == 0)  # "dark"


def test_an_input_of_the_wrong_dimension_is_a_usage_error():
    with pytest.raises(UsageError, match=r"volumes \(N, C, D, H, W\) for this 3-D model"):
        grad_cam(bright_detector(), torch.zeros(1, 1, 12, 16))
    image_model = create_model("densenet_bc10_k4", num_classes=2)
    with pytest.raises(UsageError, match=r"images \(N, C, H, W\), got \(1, 3, 8, 8, 8\)"):
        grad_cam(image_model, torch.zeros(1, 3, 8, 8, 8))


# ----------------------------------------------------------------------------- volume files

def test_volume_files_give_a_png_and_a_nifti_heat_map_of_the_input_shape(volumes, tmp_path):
    out = tmp_path / "cams"
    results = cam_for_volumes(loaded_model(), [volumes / "blob.nii.gz", volumes / "blob.npy"], out,
                              size=64)
    assert [r.class_name for r in results] == ["bright", "bright"]
    for r, name in zip(results, ["blob", "blob-2"]):  # the same name twice: -2 on the second
        assert isinstance(r, VolumeCAM) and r.cam.shape == SHAPE and r.volume.shape == (1, *SHAPE)
        assert r.probability > 0.95 and r.caption == f"bright p={r.probability:.2f}"
        assert r.peak == np.unravel_index(int(r.cam.argmax()), SHAPE)
        assert inside()[r.peak] and r.cam[r.peak] == 1.0
        assert r.png == out / f"{name}_bright_cam.png"
        assert r.nifti == out / f"{name}_bright_cam.nii.gz"
        with Image.open(r.png) as img:
            img.verify()
        with Image.open(r.png) as img:
            assert img.format == "PNG" and img.size == (3 * 64, 64 + 2 * CAPTION_HEIGHT)
        back = nib.load(str(r.nifti))
        assert back.shape == SHAPE
        np.testing.assert_array_equal(np.asarray(back.dataobj, np.float32), r.cam.numpy())
        np.testing.assert_array_equal(read_volume(r.nifti)[0], r.cam.numpy())
        assert r.to_dict() == {"volume": r.path, "class": "bright", "probability": r.probability,
                               "method": "gradcam", "peak": list(r.peak), "png": str(r.png),
                               "nifti": str(r.nifti)}
    torch.testing.assert_close(results[0].cam, results[1].cam)
    torch.testing.assert_close(results[0].volume, open_volume(volumes / "blob.npy",
                                                              loaded_model().pre))
    assert not list(out.glob(".*.tmp"))


def test_the_three_slices_pass_through_the_maximum():
    cam = torch.zeros(SHAPE)
    peak = (3, 11, 6)
    cam[peak] = 1.0
    d, h, w = peak
    fixed_d, fixed_h, fixed_w = slices_through(cam, peak)
    # each slice: its first remaining axis left to right, its second bottom to top
    assert fixed_d.shape == (SHAPE[2], SHAPE[1]) and fixed_d[SHAPE[2] - 1 - w, h] == 1.0
    assert fixed_h.shape == (SHAPE[2], SHAPE[0]) and fixed_h[SHAPE[2] - 1 - w, d] == 1.0
    assert fixed_w.shape == (SHAPE[1], SHAPE[0]) and fixed_w[SHAPE[1] - 1 - h, d] == 1.0
    np.testing.assert_array_equal(fixed_d, np.flipud(cam[d].numpy().T))


def test_the_figure_draws_the_maximum_where_the_slices_cross(tmp_path):
    size, peak = 96, (3, 11, 6)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    cam = np.exp(-((grid - np.array(peak)[:, None, None, None]) ** 2).sum(0) / 2.0)
    out = render_slices(np.zeros(SHAPE), cam, peak, tmp_path / "f.png", title="bright p=0.99",
                        size=size)
    with Image.open(out) as img:
        a = np.asarray(img.convert("RGB")).astype(int)
    assert a.shape == (size + 2 * CAPTION_HEIGHT, 3 * size, 3)
    # where each panel is reddest, mapped back to voxels, is the peak's place in that slice
    for k, (across, up) in enumerate([(1, 2), (0, 2), (0, 1)]):
        cols, rows = SHAPE[across], SHAPE[up]
        scale = size / max(rows, cols)
        left = k * size + (size - round(cols * scale)) // 2
        top = CAPTION_HEIGHT + (size - round(rows * scale)) // 2
        panel = a[CAPTION_HEIGHT:CAPTION_HEIGHT + size, k * size:(k + 1) * size]
        y, x = np.unravel_index(np.argmax(panel[..., 0] - panel[..., 2]), panel.shape[:2])
        col = (x + k * size - left + 0.5) / scale - 0.5
        row = (y + CAPTION_HEIGHT - top + 0.5) / scale - 0.5
        assert abs(col - peak[across]) <= 1 and abs(row - (rows - 1 - peak[up])) <= 1
    assert a[CAPTION_HEIGHT // 2].min() < 128 and a[-CAPTION_HEIGHT // 2].min() < 128  # text


def test_the_class_asked_for_and_a_map_without_evidence(volumes, tmp_path):
    [dark] = cam_for_volumes(loaded_model(), [volumes / "blob.npy"], tmp_path, class_name="dark",
                             size=64)
    assert dark.class_name == "dark" and dark.probability < 0.05
    assert dark.peak is None and torch.all(dark.cam == 0)  # nothing to point at
    assert dark.png.name == "blob_dark_cam.png" and dark.png.is_file() and dark.nifti.is_file()
    with pytest.raises(UsageError, match=r"'brigth'.*did you mean 'bright'"):
        cam_for_volumes(loaded_model(), [volumes / "blob.npy"], tmp_path, class_name="brigth")


def test_multi_label_gives_a_map_per_positive_label(volumes, tmp_path):
    loaded = loaded_model(task="multi-label", thresholds=[0.0, 0.5])  # both labels positive
    results = cam_for_volumes(loaded, [volumes / "blob.npy"], tmp_path, size=64)
    assert [r.class_name for r in results] == ["dark", "bright"]
    assert results[0].probability < 0.05 < 0.95 < results[1].probability  # sigmoids
    assert results[0].peak is None and inside()[results[1].peak]
    assert {p.name for p in tmp_path.iterdir()} == {
        "blob_dark_cam.png", "blob_dark_cam.nii.gz", "blob_bright_cam.png", "blob_bright_cam.nii.gz"}
    [only] = cam_for_volumes(loaded, [volumes / "blob.npy"], None, class_name="bright")
    assert only.class_name == "bright" and only.png is None and only.nifti is None


def test_occlusion_files_and_multi_label_maps_from_one_pass(volumes, tmp_path):
    [r] = cam_for_volumes(loaded_model(), [volumes / "blob.npy"], tmp_path, size=64,
                          method="occlusion", patch=2, stride=2)
    assert r.method == "occlusion" and r.to_dict()["method"] == "occlusion"
    assert inside()[r.peak] and torch.equal(r.cam > 0, inside())
    assert (r.png.name, r.nifti.name) == ("blob_bright_occlusion.png", "blob_bright_occlusion.nii.gz")
    np.testing.assert_array_equal(read_volume(r.nifti)[0], r.cam.numpy())
    loaded = loaded_model(task="multi-label", thresholds=[0.0, 0.5])  # both labels positive
    dark, bright = cam_for_volumes(loaded, [volumes / "blob.npy"], None, method="occlusion",
                                   patch=2, stride=2)
    assert dark.peak is None and torch.all(dark.cam == 0)  # covering the blob raises "dark"
    assert torch.equal(bright.cam, r.cam) and bright.probability > 0.95
    with pytest.raises(UsageError, match="Grad-CAM has none. Add --method occlusion"):
        cam_for_volumes(loaded, [volumes / "blob.npy"], None, patch=2)
    with pytest.raises(UsageError, match=r"larger than the model input \(12, 16, 8\)"):
        cam_for_volumes(loaded, [volumes / "blob.npy"], None, method="occlusion", patch=9)
    with pytest.raises(UsageError, match="one of gradcam, occlusion, got 'saliency'"):
        cam_for_volumes(loaded, [volumes / "blob.npy"], None, method="saliency")


def test_the_nifti_heat_map_lies_over_the_original_scan(tmp_path):
    """A scan stored in another orientation (axes permuted, one flipped, 2 mm voxels) and at
    another size than the model's: the heat map's affine maps its voxels to the same place in
    the scanner as the canonical scan's, its bounding box included."""
    affine = np.array([[0, 0, -2.0, 40], [2.0, 0, 0, -10], [0, 2.0, 0, 5], [0, 0, 0, 1]])
    write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((20, 24, 32)), affine)
    [r] = cam_for_volumes(loaded_model(), [tmp_path / "scan.nii.gz"], tmp_path / "out", size=64)
    heat = nib.load(str(r.nifti))
    canonical = nib.as_closest_canonical(nib.load(str(tmp_path / "scan.nii.gz")))
    source = np.array(canonical.shape, float)
    scale = source / np.array(SHAPE)
    for j in [(0, 0, 0), (11, 15, 9), (5, 2, 7)]:
        expected = canonical.affine @ [*(scale * j + (scale - 1) / 2), 1]
        np.testing.assert_allclose(heat.affine @ [*j, 1], expected, atol=1e-9)
    for corner in (-0.5, np.array(SHAPE) - 0.5):  # the voxel edges of both line up
        scan_corner = -0.5 if np.isscalar(corner) else source - 0.5
        np.testing.assert_allclose(heat.affine @ [*(np.zeros(3) + corner), 1],
                                   canonical.affine @ [*(np.zeros(3) + scan_corner), 1], atol=1e-9)
    np.testing.assert_array_equal(read_volume(r.nifti)[0], r.cam.numpy())  # RAS+ already


# ----------------------------------------------------------------------------- mistakes

def test_volumes_and_images_given_to_the_wrong_model_are_usage_errors(volumes, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    image_model = Loaded(create_model("densenet_bc10_k4", num_classes=2), "densenet_bc10_k4",
                         "image.pt", list(CLASSES),
                         Preprocess.small(32, 32, [0.5] * 3, [0.5] * 3))
    with pytest.raises(UsageError, match=r"blob.nii.gz is a volume but the model in image.pt "
                                         r"was trained on 2-D images"):
        cam_for_images(image_model, [volumes / "blob.nii.gz"])
    with pytest.raises(UsageError, match="image.pt was trained on 2-D images, not volumes"):
        cam_for_volumes(image_model, [volumes / "blob.nii.gz"], tmp_path)
    with pytest.raises(UsageError, match=r"x.png is not a volume file but the model in bright.pt"):
        cam_for_volumes(loaded_model(), [tmp_path / "x.png"], tmp_path)
    with pytest.raises(UsageError, match="bright.pt was trained on volumes"):
        cam_for_images(loaded_model(), [tmp_path / "x.png"])
    with pytest.raises(UsageError, match="is a file"):
        cam_for_volumes(loaded_model(), [volumes / "blob.npy"], tmp_path / "x.png")
    with pytest.raises(UsageError, match="2 channel"):
        np.save(tmp_path / "two.npy", np.zeros((2, *SHAPE), np.float32))
        cam_for_volumes(loaded_model(), [tmp_path / "two.npy"], tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        cam_for_volumes(loaded_model(), [tmp_path / "missing.nii.gz"], tmp_path)
    assert not list(tmp_path.glob("*_cam*"))


# ----------------------------------------------------------------------------- the command

def test_cam_command_routes_volumes_to_the_volume_maps(checkpoint, volumes, tmp_path, capsys):
    out = tmp_path / "cams"
    assert main(["cam", str(checkpoint), str(volumes / "blob.nii.gz"), "--out", str(out),
                 "--size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    path, name, p, _, peak, png, nifti = lines[0].split()
    assert (path, name) == (str(volumes / "blob.nii.gz"), "bright") and 0.95 < float(p) <= 1
    assert inside()[tuple(int(v) for v in peak.split(","))]
    assert (png, nifti) == (str(out / "blob_bright_cam.png"), str(out / "blob_bright_cam.nii.gz"))
    assert str(out) in lines[-1]
    with Image.open(png) as img:
        assert img.size == (3 * 64, 64 + 2 * CAPTION_HEIGHT)
    assert nib.load(nifti).shape == SHAPE


def test_cam_command_draws_occlusion_with_its_patch(checkpoint, volumes, tmp_path, capsys):
    out = tmp_path / "cams"
    assert main(["cam", str(checkpoint), str(volumes / "blob.nii.gz"), "--out", str(out),
                 "--size", "64", "--method", "occlusion", "--patch", "2", "--stride", "2"]) == 0
    path, name, _, _, peak, png, nifti = capsys.readouterr().out.splitlines()[0].split()
    assert name == "bright" and inside()[tuple(int(v) for v in peak.split(","))]
    assert (png, nifti) == (str(out / "blob_bright_occlusion.png"),
                            str(out / "blob_bright_occlusion.nii.gz"))
    assert torch.equal(torch.from_numpy(read_volume(nifti)[0]) > 0, inside())
    assert main(["cam", str(checkpoint), str(volumes / "blob.nii.gz"), "--out", str(out),
                 "--patch", "2"]) == 2
    assert "add --method occlusion" in capsys.readouterr().err
    assert main(["cam", str(checkpoint), str(volumes / "blob.nii.gz"), "--out", str(out),
                 "--method", "occlusion", "--patch", "13"]) == 2
    assert "give at most 8 (--patch)" in capsys.readouterr().err


def test_cam_command_mistakes_with_volumes_exit_2_with_a_message(checkpoint, volumes, tmp_path,
                                                                 capsys):
    def error(*args):
        assert main(["cam", *map(str, args)]) == 2
        return capsys.readouterr().err

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    image_ckpt = tmp_path / "image.pt"
    save_checkpoint(image_ckpt, {
        "model": {"name": "densenet_bc10_k4", "overrides": {"num_classes": 2}},
        "state_dict": create_model("densenet_bc10_k4", num_classes=2).state_dict(),
        "classes": CLASSES, "preprocess": Preprocess.small(32, 32, [0.5] * 3, [0.5] * 3).to_dict()})
    out = tmp_path / "cams"
    assert "trained on 2-D images" in error(image_ckpt, volumes / "blob.nii.gz", "--out", out)
    assert "trained on volumes" in error(checkpoint, tmp_path / "x.png", "--out", out)
    assert "not both" in error(checkpoint, volumes / "blob.npy", tmp_path / "x.png", "--out", out)
    assert "give a folder" in error(checkpoint, volumes / "blob.npy", "--out", tmp_path / "c.png")
    assert "is a file" in error(checkpoint, volumes / "blob.npy", "--out", tmp_path / "x.png")
    assert "'nope'" in error(checkpoint, volumes / "blob.npy", "--class", "nope", "--out", out)
    assert not out.exists()
