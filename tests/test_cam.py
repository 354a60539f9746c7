"""Grad-CAM: a known answer on a hand-built network, the efficient path against the plain one,
and the ``densenet cam`` command's PNG and errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import create_model
from densenet.cam import CAPTION_HEIGHT, cam_for_images, grad_cam, occlusion, render_panels
from densenet.cli import main
from densenet.errors import UsageError
from densenet.inference import image_transform, load_for_inference
from densenet.rundir import save_checkpoint

CLASSES = ["dark", "red"]
SMALL = {"kind": "small", "input_size": 32, "resize": None, "mean": [0.5] * 3, "std": [0.5] * 3}
SQUARE = (slice(4, 12), slice(20, 28))  # rows, columns of the red square (top-right quadrant)


def red_detector():
    """A DenseNet-BC (L=10, k=4) whose "red" logit is the mean redness of the image.

    conv0 copies the red channel into map 0, every BN is the identity, the dense layers add zero
    maps and the transitions pass map 0 on (their ReLU zeroes the black background, which is
    -1 after normalisation); the classifier reads map 0 with weight +32 ("red") and -32 ("dark").
    """
    model = create_model("densenet_bc10_k4", num_classes=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0), m.bias.zero_()
                m.running_mean.zero_(), m.running_var.fill_(1.0)
        model.features.conv0.weight[0, 0, 1, 1] = 1.0
        model.features.transition1.conv.weight[0, 0] = 1.0
        model.features.transition2.conv.weight[0, 0] = 1.0
        model.classifier.weight.zero_(), model.classifier.bias.zero_()
        model.classifier.weight[1, 0], model.classifier.weight[0, 0] = 32.0, -32.0
    return model.eval()


def red_square_image(path=None, size=32):
    a = np.zeros((size, size, 3), np.uint8)
    a[SQUARE[0], SQUARE[1]] = (255, 0, 0)
    img = Image.fromarray(a)
    if path is not None:
        img.save(path)
    return img


def inside_square():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[SQUARE] = True
    return mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cam") / "red.pt"
    save_checkpoint(path, {"model": {"name": "densenet_bc10_k4", "overrides": {"num_classes": 2}},
                           "state_dict": red_detector().state_dict(), "classes": CLASSES,
                           "preprocess": SMALL})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    red_square_image(d / "square.png")
    red_square_image(size=45).save(d / "large.png")  # resized to 32 px as in training
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "all_red.png")
    return [d / "square.png", d / "large.png", d / "all_red.png"]


# ----------------------------------------------------------------------------- the maps

@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_the_map_is_on_the_square_that_decides_the_class(implementation):
    model = red_detector().set_implementation(implementation)
    x = image_transform(SMALL)(red_square_image())[None]
    cams, probs, classes = grad_cam(model, x)
    assert classes.tolist() == [1] and probs[0, 1] > 0.95
    cam, inside = cams[0], inside_square()
    assert cam.shape == (32, 32) and cam.max() == 1.0 and cam.min() >= 0.0
    assert inside.flatten()[cam.argmax()]
    assert cam[inside].mean() > 5 * cam[~inside].mean()


def test_a_class_without_positive_evidence_has_an_all_zero_map():
    x = image_transform(SMALL)(red_square_image())[None]
    result = grad_cam(red_detector(), x, target=0)  # "dark": red counts against it
    assert result.classes.tolist() == [0]
    assert torch.all(result.cams == 0)


def test_occlusion_is_positive_exactly_on_the_square():
    """4-pixel patches tile the image and the square's edges: covering part of the square with
    the image's mean (its red channel is negative) removes that redness; covering the black
    background changes nothing."""
    x = image_transform(SMALL)(red_square_image())[None]
    result = occlusion(red_detector(), x, patch=4, stride=4)
    assert result.classes.tolist() == [1] and result.cams.shape == (1, 32, 32)
    assert torch.equal(result.cams[0] > 0, inside_square()) and result.cams.max() == 1.0
    assert torch.all(occlusion(red_detector(), x, target=0).cams == 0)  # "dark"


def measured_model():
    """A random DenseNet-BC with BN statistics of real batches (not the identity)."""
    torch.manual_seed(0)
    model = create_model("densenet_bc16_k4", num_classes=5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_efficient_and_reference_paths_give_the_same_maps_and_leave_no_gradients():
    model = measured_model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for target in (None, [0, 1, 2, 4]):
        fast = grad_cam(model.set_implementation("efficient"), x, target)
        plain = grad_cam(model.set_implementation("reference"), x, target)
        assert torch.equal(fast.classes, plain.classes)
        torch.testing.assert_close(fast.cams, plain.cams, rtol=0, atol=1e-5)
        torch.testing.assert_close(fast.probs, plain.probs, rtol=0, atol=1e-5)
    assert fast.classes.tolist() == [0, 1, 2, 4]
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():  # the gradient it needs is taken all the same
        torch.testing.assert_close(grad_cam(model, x, [0, 1, 2, 4]).cams, plain.cams,
                                   rtol=0, atol=1e-5)
    with torch.no_grad():
        grad_cam(model, x)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    model.train()
    grad_cam(model, x)
    assert model.training  # put back in the mode it was in


def test_a_target_out_of_range_or_of_the_wrong_length_is_a_usage_error():
    model, x = red_detector(), torch.zeros(2, 3, 32, 32)
    with pytest.raises(UsageError, match="out of range"):
        grad_cam(model, x, target=2)
    with pytest.raises(UsageError, match="one per image"):
        grad_cam(model, x, target=[0, 1, 1])


def test_the_class_asked_for_is_explained_with_its_probability(checkpoint, images):
    loaded = load_for_inference(checkpoint)
    [top] = cam_for_images(loaded, images[:1])
    [dark] = cam_for_images(loaded, images[:1], class_name="dark")
    x = image_transform(SMALL)(Image.open(images[0]).convert("RGB"))[None]
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)
    assert (top.class_name, dark.class_name) == ("red", "dark")
    assert top.probability == pytest.approx(float(probs[0, 1]), abs=1e-6)
    assert dark.probability == pytest.approx(float(probs[0, 0]), abs=1e-6)
    assert top.caption == f"red p={top.probability:.2f}"
    assert top.image.size == (32, 32) and np.asarray(top.image)[6, 22].tolist() == [255, 0, 0]


# ----------------------------------------------------------------------------- the picture

def test_panels_have_the_documented_size_and_blend_the_jet_colours(tmp_path):
    black = torch.zeros(3, 32, 32)
    out = render_panels([black, black], [torch.zeros(8, 8), torch.ones(8, 8)], ["a", "b"],
                        tmp_path / "new" / "folder" / "p.png", size=64)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (2 * 64, 64 + CAPTION_HEIGHT)
        a = np.asarray(img.convert("RGB"))
    # half black, half jet: 0 is dark blue (0, 0, 0.5), 1 is dark red (0.5, 0, 0)
    assert a[10, 10].tolist() == [0, 0, 64] and a[10, 64 + 10].tolist() == [64, 0, 0]
    assert a[64 + CAPTION_HEIGHT // 2, :].min() < 128  # the captions are drawn
    assert not list(out.parent.glob(".*.tmp"))


def grey_16_bit(path=None):
    """A 16-bit greyscale image at a third of full scale (a DICOM export, say)."""
    img = Image.fromarray(np.full((32, 32), 21845, np.uint16))
    assert img.mode == "I;16"
    if path is not None:
        img.save(path)
    return img


def test_a_16_bit_image_is_drawn_grey_as_the_model_sees_it_not_white(tmp_path):
    out = render_panels([grey_16_bit()], [torch.zeros(8, 8)], ["x"], tmp_path / "p.png", size=64)
    with Image.open(out) as img:
        a = np.asarray(img.convert("RGB"))
    # half the picture's 85 (21845 / 257) and half jet's dark blue (0, 0, 128); Pillow's own
    # conversion would draw the picture white, 128 after the blend
    assert np.abs(a[10, 10].astype(int) - [42.5, 42.5, 106]).max() <= 1


def test_cam_of_a_16_bit_file_sees_the_pixels_predict_sees(checkpoint, tmp_path):
    grey_16_bit(tmp_path / "grey.png")
    [result] = cam_for_images(load_for_inference(checkpoint), [tmp_path / "grey.png"])
    assert np.asarray(result.image)[0, 0].tolist() == [85, 85, 85]


def test_an_output_that_is_a_folder_or_not_a_png_or_not_writable_is_a_usage_error(tmp_path):
    args = ([torch.zeros(3, 8, 8)], [torch.zeros(8, 8)], ["x"])
    with pytest.raises(UsageError, match="is a directory"):
        render_panels(*args, tmp_path)
    with pytest.raises(UsageError, match=r"\.png"):
        render_panels(*args, tmp_path / "cam.jpg")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write"):
        render_panels(*args, tmp_path / "file" / "cam.png")


# ----------------------------------------------------------------------------- the command

@pytest.mark.parametrize("n", [1, 3])
def test_cam_command_writes_one_panel_per_image(checkpoint, images, tmp_path, capsys, n):
    out = tmp_path / "sub" / "cam.png"
    assert main(["cam", str(checkpoint), *map(str, images[:n]), "--out", str(out)]) == 0
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (n * 224, 224 + CAPTION_HEIGHT)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == n + 1 and str(out) in lines[-1]
    path, name, p = lines[0].split()
    assert (path, name) == (str(images[0]), "red") and 0.95 < float(p) <= 1


def test_cam_command_explains_the_class_asked_for(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "dark.png"
    assert main(["cam", str(checkpoint), str(images[0]), "--class", "dark", "--size", "96",
                 "--out", str(out)]) == 0
    _, name, p = capsys.readouterr().out.splitlines()[0].split()
    expected = cam_for_images(load_for_inference(checkpoint), images[:1], "dark")[0].probability
    assert name == "dark" and float(p) == pytest.approx(expected, abs=1e-4) and float(p) < 0.05
    with Image.open(out) as img:
        assert img.size == (96, 96 + CAPTION_HEIGHT)


def test_cam_command_draws_occlusion(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "occlusion.png"
    assert main(["cam", str(checkpoint), str(images[0]), "--method", "occlusion", "--patch", "4",
                 "--stride", "4", "--size", "64", "--out", str(out)]) == 0
    _, name, p = capsys.readouterr().out.splitlines()[0].split()
    assert name == "red" and float(p) > 0.95
    with Image.open(out) as img:
        assert img.size == (64, 64 + CAPTION_HEIGHT)
    [r] = cam_for_images(load_for_inference(checkpoint), images[:1], method="occlusion", patch=4,
                         stride=4)
    assert torch.equal(r.cam > 0, inside_square())
    assert main(["cam", str(checkpoint), str(images[0]), "--stride", "2", "--out", str(out)]) == 2
    assert "add --method occlusion" in capsys.readouterr().err
    assert main(["cam", str(checkpoint), str(images[0]), "--method", "occlusion", "--patch", "33",
                 "--out", str(out)]) == 2
    assert "larger than the model input (32, 32)" in capsys.readouterr().err


def test_cam_command_mistakes_exit_2_with_a_message(checkpoint, images, tmp_path, capsys):
    def error(*args):
        assert main(["cam", *map(str, args)]) == 2
        return capsys.readouterr().err

    out = tmp_path / "cam.png"
    message = error(checkpoint, images[0], "--class", "blue", "--out", out)
    assert "'blue'" in message and "'dark'" in message and "'red'" in message
    assert "does not exist" in error(checkpoint, tmp_path / "missing.png", "--out", out)
    assert "is a directory" in error(checkpoint, images[0], "--out", tmp_path)
    assert "IMAGE" in error(checkpoint, "--out", out)
    # foreign small-image weights do not say how to normalise the images
    torch.save(red_detector().state_dict(), tmp_path / "w.pth")
    message = error("--weights", tmp_path / "w.pth", "--model", "densenet_bc10_k4", images[0],
                    "--out", out)
    assert "normalised" in message
    assert not out.exists()


def test_cam_command_with_foreign_imagenet_weights(images, tmp_path, capsys):
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), tmp_path / "tv121.pth")
    out = tmp_path / "cam.png"
    assert main(["cam", "--weights", str(tmp_path / "tv121.pth"), "--model", "densenet121",
                 str(images[0]), "--out", str(out), "--size", "64"]) == 0
    path, *name, p = capsys.readouterr().out.splitlines()[0].split()
    assert path == str(images[0]) and 0 < float(p) <= 1
    from densenet.inference import imagenet_class_names
    assert " ".join(name) in imagenet_class_names()  # 1000 outputs: ImageNet's names
    with Image.open(out) as img:
        assert img.size == (64, 64 + CAPTION_HEIGHT)
