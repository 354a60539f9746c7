"""Evaluation and prediction: the paper's 10-crop, classes matched by name, any image, clear errors."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from densenet import create_model
from densenet.rundir import load_checkpoint, save_checkpoint
from densenet.errors import UsageError
from densenet.metrics import ten_crop_probabilities
from densenet.inference import evaluate, image_transform, load_for_inference, open_image, predict
from densenet.preprocess import to_rgb

COLOURS = {"blue": (30, 40, 200), "green": (30, 190, 40), "red": (210, 30, 30)}
IMAGENET = {"kind": "imagenet", "input_size": 224, "resize": 256,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def solid_images(root, classes, per_class, size, seed=0):
    """ROOT/CLASS/i.png: one colour per class, with pixel noise."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-25, 26, size=(size[1], size[0], 3))
            a = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """The small-image tensor cache of these throw-away folders goes to a temporary directory
    (the commands run as subprocesses inherit it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DENSENET_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny DenseNet-BC trained on red, green and blue images: confident on new ones."""
    from densenet.train import train
    d = tmp_path_factory.mktemp("colours")
    data = solid_images(d / "train", COLOURS, 24, (32, 32))
    train(model="densenet_bc16_k4", recipe="c10", data=str(data), out=str(d / "run"), epochs=6,
          batch_size=16, quiet=True, set_fields={"val_size": "0"}, workers=0)
    return d / "run"


def test_predict_names_the_colour_of_a_new_image(trained_run, tmp_path):
    # a new size, and a palette image: converted and resized as the 32 px training images were
    a = np.zeros((45, 61, 3), np.uint8)
    a[:] = COLOURS["green"]
    Image.fromarray(a).convert("P").save(tmp_path / "green.png")
    a[:] = COLOURS["red"]
    Image.fromarray(a).convert("RGBA").save(tmp_path / "red.png")
    out = predict(load_for_inference(trained_run), [tmp_path / "green.png", tmp_path / "red.png"],
                  topk=3)
    assert [r["top"][0][0] for r in out] == ["green", "red"]
    assert all(r["top"][0][1] > 0.8 for r in out)
    assert sorted(name for name, _ in out[0]["top"]) == sorted(COLOURS)


def permuted_checkpoint(run_dir, path, order):
    """The same network with its classes (and classifier rows) listed in another order."""
    p = load_checkpoint(run_dir / "best.pt")
    index = [p["classes"].index(c) for c in order]
    state = dict(p["state_dict"])
    state["classifier.weight"] = state["classifier.weight"][index]
    state["classifier.bias"] = state["classifier.bias"][index]
    save_checkpoint(path, {**p, "classes": list(order), "state_dict": state})
    return path


def test_eval_matches_classes_by_name_whatever_their_order(trained_run, tmp_path):
    data = solid_images(tmp_path / "test", COLOURS, 8, (32, 32), seed=1)
    reference = evaluate(load_for_inference(trained_run), str(data))
    shuffled = permuted_checkpoint(trained_run, tmp_path / "shuffled.pt", ["red", "blue", "green"])
    other = evaluate(load_for_inference(shuffled), str(data))
    assert reference["n"] == other["n"] == 24
    assert reference["single_crop"]["top1_error"] <= 1 / 24  # index order would give 2/3 or more
    for key in ("top1_error", "top5_error"):
        assert other["single_crop"][key] == reference["single_crop"][key]
    assert other["single_crop"]["loss"] == pytest.approx(reference["single_crop"]["loss"], rel=1e-4)
    subset = solid_images(tmp_path / "two", ["red", "green"], 8, (32, 32), seed=1)
    assert evaluate(load_for_inference(shuffled), str(subset))["single_crop"]["top1_error"] <= 1 / 16


def test_eval_refuses_a_class_the_model_never_saw(trained_run, tmp_path):
    COLOURS_PLUS = {**COLOURS, "purple": (150, 40, 160)}
    data = tmp_path / "d"
    for name in ("red", "purple"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), COLOURS_PLUS[name]).save(data / name / "0.png")
    with pytest.raises(UsageError, match="purple"):
        evaluate(load_for_inference(trained_run), str(data))


# ----------------------------------------------------------------------------- 10-crop

def tiny_imagenet_checkpoint(path, classes):
    """An ImageNet-stem DenseNet small enough for tests, with measured BN statistics."""
    overrides = {"growth_rate": 4, "block_config": (1, 1, 1, 1), "num_init_features": 8,
                 "num_classes": len(classes)}
    torch.manual_seed(0)
    model = create_model("densenet121", **overrides)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 224, 224))
    save_checkpoint(path, {"model": {"name": "densenet121", "overrides": overrides},
                           "state_dict": model.eval().state_dict(), "classes": list(classes),
                           "preprocess": IMAGENET})
    return path


def smooth_image(seed, size=(300, 260)):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def ten_crops_by_hand(img, size=224, resize=256):
    """Short side to 256 (long side truncated, as torchvision's Resize), then the four corners
    and the centre of the image and of its mirror image."""
    w, h = img.size
    img = img.resize((resize, int(h * resize / w)) if w < h else (int(w * resize / h), resize),
                     Image.BILINEAR)
    w, h = img.size
    boxes = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size),
             (int(round((w - size) / 2)), int(round((h - size) / 2)))]
    return [im.crop((x, y, x + size, y + size))
            for im in (img, img.transpose(Image.FLIP_LEFT_RIGHT)) for x, y in boxes]


def by_hand(model, img):
    """Softmax of each of the ten crops, one at a time, averaged; and the centre crop's."""
    probs = []
    with torch.no_grad():
        for crop in ten_crops_by_hand(img):
            x = TF.normalize(TF.to_tensor(crop), IMAGENET["mean"], IMAGENET["std"])
            probs.append(model(x[None]).softmax(1)[0])
    return torch.stack(probs).mean(0), probs[4]


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("large")
    classes = ["cat", "dog", "fox"]
    for i, name in enumerate(classes * 2):
        (d / "images" / name).mkdir(parents=True, exist_ok=True)
        smooth_image(i, (300 - 7 * i, 260 + 11 * i)).save(d / "images" / name / f"{i}.jpg", quality=95)
    return d / "images", tiny_imagenet_checkpoint(d / "model.pt", ["fox", "cat", "dog"])


def test_ten_crop_is_the_average_softmax_of_the_ten_crops_by_hand(large_folder):
    _, ckpt = large_folder
    model = load_for_inference(ckpt).model
    img = smooth_image(42, (333, 270))
    crops = image_transform(IMAGENET, ten_crop=True)(img)
    assert crops.shape == (10, 3, 224, 224)
    expected, _ = by_hand(model, img)
    with torch.no_grad():
        got = ten_crop_probabilities(model, crops[None])[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_eval_ten_crop_gives_the_errors_of_the_crops_by_hand(large_folder):
    folder, ckpt = large_folder
    loaded = load_for_inference(ckpt)
    result = evaluate(loaded, str(folder), ten_crop=True, workers=0)
    wrong_ten = wrong_single = 0
    paths = sorted(folder.glob("*/*.jpg"))
    for path in paths:
        ten, single = by_hand(loaded.model, open_image(path))
        label = loaded.classes.index(path.parent.name)
        wrong_ten += int(ten.argmax()) != label
        wrong_single += int(single.argmax()) != label
    assert result["n"] == len(paths) == 6
    assert result["ten_crop"]["top1_error"] == pytest.approx(wrong_ten / 6)
    assert result["single_crop"]["top1_error"] == pytest.approx(wrong_single / 6)
    # the single-crop pass (no --ten-crop) agrees with the centre crop of the 10-crop pass
    plain = evaluate(loaded, str(folder), workers=0)
    assert plain["single_crop"]["top1_error"] == pytest.approx(wrong_single / 6)
    assert "ten_crop" not in plain


# ----------------------------------------------------------------------------- images, weights

@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_any_image_mode_becomes_8_bit_rgb(mode):
    img = Image.new(mode, (5, 4))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (5, 4)


def test_16_bit_greyscale_is_scaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # half of 65535
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [128, 128, 128]


def test_torchvision_and_timm_files_load_with_weights_and_model(tmp_path):
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}},
               tmp_path / "timm.pth.tar")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = tv(x)
        for f in ("tv.pth", "timm.pth.tar"):
            loaded = load_for_inference(weights=str(tmp_path / f), model="densenet121")
            torch.testing.assert_close(loaded.model(x), expected)
            assert loaded.preprocess["resize"] == 256 and loaded.classes is None
    smooth_image(0).save(tmp_path / "x.png")
    top = predict(loaded, [tmp_path / "x.png"], topk=1)[0]["top"]
    assert top[0][0] in torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.meta["categories"]


# ----------------------------------------------------------------------------- the commands

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "densenet", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_clear_error(r, path):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert str(path) in r.stderr


def test_eval_and_predict_commands(trained_run, tmp_path):
    data = solid_images(tmp_path / "test", COLOURS, 4, (32, 32), seed=3)
    r = run_cli("eval", trained_run, "--data", data, "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "top-1 err" in r.stdout and "single crop" in r.stdout
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert numbers["n"] == 12 and numbers["single_crop"]["top1_error"] <= 1 / 12
    r = run_cli("predict", trained_run, data / "blue" / "0.png", "--topk", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[1] == "blue"


def test_a_corrupt_image_is_a_clear_error(trained_run, tmp_path):
    smooth_image(1).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[:len(data) // 2])
    assert_clear_error(run_cli("predict", trained_run, tmp_path / "half.jpg"), tmp_path / "half.jpg")


def test_a_missing_image_is_a_clear_error(trained_run, tmp_path):
    assert_clear_error(run_cli("predict", trained_run, tmp_path / "nope.png"), tmp_path / "nope.png")


def test_a_checkpoint_of_unknown_format_is_a_clear_error(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    assert_clear_error(run_cli("eval", text, "--data", tmp_path), text)
    listed = tmp_path / "list.pt"  # and in-process, for the other readers (tests/test_export.py
    listed.write_bytes(pickle.dumps(["not", "a", "checkpoint"]))  # runs them as commands)
    torch.save([1, 2], tmp_path / "saved_list.pt")
    for bad in (listed, tmp_path / "saved_list.pt"):
        with pytest.raises(UsageError, match=str(bad)):
            load_for_inference(bad)
        with pytest.raises(UsageError, match=str(bad)):
            load_for_inference(weights=str(bad), model="densenet121")


def test_ten_crop_on_small_images_is_refused(trained_run, tmp_path):
    data = solid_images(tmp_path / "test", COLOURS, 2, (32, 32))
    with pytest.raises(UsageError, match="--ten-crop"):
        evaluate(load_for_inference(trained_run), str(data), ten_crop=True)


def test_a_corrupt_image_in_eval_data_names_the_file_without_a_traceback(large_folder, tmp_path):
    folder, ckpt = large_folder
    data = tmp_path / "data"
    for path in sorted(folder.glob("*/*.jpg")):
        (data / path.parent.name).mkdir(parents=True, exist_ok=True)
        (data / path.parent.name / path.name).write_bytes(path.read_bytes())
    bad = data / "dog" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:2000])
    for ten_crop in (False, True):
        with pytest.raises(UsageError) as e:
            evaluate(load_for_inference(ckpt), str(data), ten_crop=ten_crop, workers=1)
        assert str(bad) in str(e.value) and "Traceback" not in str(e.value)


def test_result_header_names_the_users_data_by_its_path():
    from densenet.inference import format_result
    base = {"model": "densenet121", "checkpoint": "run/best.pt", "n": 12,
            "single_crop": {"top1_error": 0.25, "top5_error": 0.0}}
    vols = format_result({**base, "dataset": "volumes", "data": "scans/", "split": "train"})
    assert vols.splitlines()[0] == "densenet121 (run/best.pt) on scans/ (train split): 12 volumes"
    named = format_result({**base, "dataset": "cifar10", "data": "cifar10", "split": "test", "n": 10000})
    assert named.splitlines()[0] == "densenet121 (run/best.pt) on cifar10 test: 10,000 images"
    assert "25.00%" in named.splitlines()[2]
