"""The preprocessing record: one pixel conversion and one set of transforms, so an image file is
the same tensor in training and in eval/predict whatever its mode; the record round-trips and
reads every checkpoint written so far."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import data
from densenet.errors import UsageError
from densenet.inference import load_for_inference, open_image
from densenet.preprocess import Preprocess, resize_for, to_rgb
from densenet.rundir import load_checkpoint, save_checkpoint

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


# ----------------------------------------------------------------------------- images

def gradient(size):
    """(h, w) values 0..1 rising along both axes."""
    h, w = size
    return np.add.outer(np.arange(h), np.arange(w)) / (h + w - 2)


def rgb_gradient(size):
    g = gradient(size)
    return np.stack([g, 1 - g, np.full_like(g, 0.3)], -1)


def write(kind, path, size):
    """An image file of ``kind`` whose pixels cover the whole range."""
    if kind == "I;16":  # 16-bit greyscale, as from DICOM
        img = Image.fromarray(np.round(gradient(size) * 65535).astype(np.uint16))
        assert img.mode == "I;16"
    else:
        rgb = Image.fromarray(np.round(rgb_gradient(size) * 255).astype(np.uint8))
        if kind == "LA":
            img = rgb.convert("L").convert("LA")
            img.putalpha(Image.fromarray(np.round(gradient(size) * 255).astype(np.uint8)))
        elif kind == "RGBA":
            img = rgb.convert("RGBA")
            img.putalpha(Image.fromarray(np.round(gradient(size) * 255).astype(np.uint8)))
        else:
            img = rgb.convert(kind)
    suffix = ".tiff" if kind == "CMYK" else ".png"  # PNG has no CMYK
    path = path.with_suffix(suffix)
    img.save(path)
    with Image.open(path) as back:
        assert back.mode == kind
    return path


MODES = ["I;16", "P", "LA", "RGBA", "CMYK"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


def small_folder(root, kind):
    """Two class folders of 32 px images; the first image is the one of ``kind``."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    path = write(kind, root / "a" / "0", (32, 32))
    Image.new("RGB", (32, 32), (10, 200, 30)).save(root / "b" / "0.png")
    return path


def unnormalised(x, pre):
    return x * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)


@pytest.mark.parametrize("input_size", [32, 64], ids=["native", "upscaled"])
@pytest.mark.parametrize("kind", MODES)
def test_a_small_image_is_the_same_tensor_in_training_and_in_predict(tmp_path, kind, input_size):
    path = small_folder(tmp_path / "data", kind)
    pre = Preprocess.small(32, input_size, MEAN, STD)
    ds = data.open_dataset(tmp_path / "data")
    assert ds.small
    (x, y), = list(data.DeviceLoader(ds.train, 8, preprocess=pre))  # training, no augmentation
    assert y.tolist() == [0, 1]
    predicted = pre.eval_transform()(open_image(path, pre))
    assert predicted.shape == (3, input_size, input_size)
    assert torch.equal(x[0], predicted)


@pytest.mark.parametrize("kind", MODES)
def test_a_large_image_is_the_same_tensor_in_the_file_loader_and_in_predict(tmp_path, kind):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
    path = write(kind, tmp_path / "data" / "a" / "0", (90, 120))
    write("RGBA", tmp_path / "data" / "b" / "0", (90, 120))
    ds = data.open_dataset(tmp_path / "data")
    assert not ds.small
    pre = Preprocess.files(64, MEAN, STD)
    x, y = next(iter(data.make_file_loader(ds.train, 2, train=False, preprocess=pre, workers=0)))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 1]
    assert torch.equal(x[0], pre.eval_transform()(open_image(path, pre)))
    # and training's random crops are made from the same converted pixels
    torch.manual_seed(0)
    (x, _), = list(data.make_file_loader(ds.train, 2, train=True, preprocess=pre, workers=0))
    assert x.shape == (2, 3, 64, 64)
    grey = unnormalised(x[0], pre)
    assert 0.05 < grey.mean() < 0.95 and (grey > 0.999).float().mean() < 0.5


def test_a_16_bit_gradient_is_mid_grey_not_white_in_training(tmp_path):
    small_folder(tmp_path / "data", "I;16")
    pre = Preprocess.small(32, 32, MEAN, STD)
    (x, _), = list(data.DeviceLoader(data.open_dataset(tmp_path / "data").train, 8, preprocess=pre))
    pixels = unnormalised(x[0], pre)
    assert pixels.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (pixels > 0.999).float().mean() < 0.01  # Pillow's convert("RGB") saturates 99.6%
    # the three channels are the grey value, the gradient's values kept in order
    assert torch.allclose(pixels[0], pixels[1]) and torch.allclose(pixels[1], pixels[2])
    assert pixels[0, 0, 0] < pixels[0, 15, 15] < pixels[0, 31, 31]


def test_16_bit_images_cached_by_an_older_version_are_decoded_again(tmp_path, monkeypatch):
    small_folder(tmp_path / "data", "I;16")
    version = data.CACHE_VERSION
    monkeypatch.setattr(data, "CACHE_VERSION", version - 1)
    old = data.open_dataset(tmp_path / "data")
    monkeypatch.setattr(data, "CACHE_VERSION", version)
    decoded = []
    real = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda paths: decoded.append(paths) or real(paths))
    new = data.open_dataset(tmp_path / "data")
    assert len(decoded) == 1  # the old version's cache entry is not trusted
    assert torch.equal(new.train.images, old.train.images)


def test_the_conversion_rescales_16_bit_and_keeps_8_bit_values():
    img = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 1, 128, 255]
    rgb = Image.fromarray(np.array([[[1, 2, 3]]], np.uint8))
    assert np.asarray(to_rgb(rgb.convert("P", palette=Image.Palette.ADAPTIVE)))[0, 0].tolist() == [1, 2, 3]


def test_the_sample_data_is_decoded_with_the_same_conversion(monkeypatch):
    from densenet import sample
    seen = []
    monkeypatch.setattr(sample, "to_rgb", lambda img: seen.append(img.mode) or to_rgb(img))
    ds = sample.load_cifar10_sample()
    assert len(seen) == len(ds.train) + len(ds.test) and ds.train.images.dtype == torch.uint8


# ----------------------------------------------------------------------------- the record

def test_the_resize_rule_is_imagenets_256_for_224():
    assert resize_for(224) == 256 and resize_for(64) == 73 and resize_for(320) == 366
    assert Preprocess.files(224, MEAN, STD).resize == 256


@pytest.mark.parametrize("pre", [Preprocess.small(32, 32, MEAN, STD),
                                 Preprocess.small(32, 64, MEAN, STD),
                                 Preprocess.files(224, MEAN, STD),
                                 Preprocess.files(160, [0.5] * 3, [0.5] * 3, resize=200),
                                 Preprocess.small(32, 32, None, None)],
                         ids=["small", "upscaled", "files", "own-resize", "unknown-stats"])
def test_the_record_round_trips_through_a_dict_json_and_a_checkpoint(tmp_path, pre):
    d = pre.to_dict()
    assert d["mode"] == "rgb8" and ("image_size" in d) == (pre.kind == "small")
    assert Preprocess.from_dict(d) == pre
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == pre
    save_checkpoint(tmp_path / "c.pt", {"model": {"name": "densenet_bc10_k4"}, "state_dict": {},
                                        "preprocess": d})
    assert Preprocess.from_dict(load_checkpoint(tmp_path / "c.pt")["preprocess"]) == pre


@pytest.mark.parametrize("old,expected", [
    # as densenet train wrote them before the record: no mode
    ({"kind": "small", "input_size": 32, "image_size": 32, "resize": None, "mean": MEAN, "std": STD},
     Preprocess.small(32, 32, MEAN, STD)),
    ({"kind": "small", "input_size": 64, "image_size": 32, "resize": None, "mean": MEAN, "std": STD},
     Preprocess.small(32, 64, MEAN, STD)),
    ({"kind": "imagenet", "input_size": 224, "resize": 256, "mean": MEAN, "std": STD},
     Preprocess.files(224, MEAN, STD)),
    # older still: small ones without image_size, and no resize
    ({"kind": "small", "input_size": 32, "resize": None, "mean": MEAN, "std": STD},
     Preprocess.small(32, 32, MEAN, STD)),
    ({"kind": "imagenet", "input_size": 224, "mean": MEAN, "std": STD},
     Preprocess.files(224, MEAN, STD)),
])
def test_checkpoint_dicts_written_before_the_record_still_load(old, expected):
    pre = Preprocess.from_dict(old)
    assert pre == expected and pre.mode == "rgb8"


def test_a_checkpoint_without_the_mode_is_predicted_as_it_was_trained(tmp_path):
    from densenet import create_model
    old = {"kind": "small", "input_size": 32, "image_size": 32, "resize": None, "mean": MEAN,
           "std": STD}
    save_checkpoint(tmp_path / "old.pt", {"model": {"name": "densenet_bc10_k4", "overrides": {}},
                                          "state_dict": create_model("densenet_bc10_k4").state_dict(),
                                          "classes": [str(i) for i in range(10)], "preprocess": old})
    loaded = load_for_inference(str(tmp_path / "old.pt"))
    assert loaded.pre == Preprocess.small(32, 32, MEAN, STD)
    assert loaded.preprocess == {**old, "mode": "rgb8"}


GOOD = {"kind": "imagenet", "input_size": 224, "resize": 256, "mean": MEAN, "std": STD}


@pytest.mark.parametrize("bad,match", [
    (None, "run/best.pt has no 'preprocess' entry"),
    ([1, 2], "a list, not a dict"),
    ({"kind": "small", "input_size": 32}, "lacks mean, std"),
    ({**GOOD, "kind": "medium"}, "kind must be 'small', 'imagenet' or 'volume', not 'medium'"),
    ({**GOOD, "input_size": 0}, "input_size must be a whole number of pixels >= 1, not 0"),
    ({**GOOD, "input_size": "224"}, "input_size must be a whole number"),
    ({**GOOD, "input_size": True}, "input_size must be a whole number"),
    ({**GOOD, "resize": 100}, "resize must be .* at least input_size"),
    ({**GOOD, "image_size": 32}, "image_size is for small images"),
    ({**GOOD, "mean": [0.5, 0.5]}, "three numbers"),
    ({**GOOD, "mean": "rgb"}, "three numbers"),
    ({**GOOD, "std": [0.2, 0.0, 0.2]}, "std must be positive"),
    ({**GOOD, "mean": [0.5, float("nan"), 0.5]}, "mean must be three finite numbers"),
    ({**GOOD, "std": None}, "both mean and std, or neither"),
    ({**GOOD, "mode": "rgb16"}, "pixel conversion 'rgb16' is not one this version knows"),
    ({"kind": "small", "input_size": 32, "image_size": 64, "mean": MEAN, "std": STD},
     "image_size.*at most input_size"),
    ({"kind": "small", "input_size": 32, "resize": 36, "mean": MEAN, "std": STD},
     "resize must be None"),
])
def test_a_bad_record_is_a_clear_error(bad, match):
    with pytest.raises(UsageError, match=match):
        Preprocess.from_dict(bad, "run/best.pt")


def test_a_checkpoint_with_a_bad_record_is_refused_naming_the_file(tmp_path):
    from densenet import create_model
    save_checkpoint(tmp_path / "bad.pt", {"model": {"name": "densenet_bc10_k4", "overrides": {}},
                                          "state_dict": create_model("densenet_bc10_k4").state_dict(),
                                          "classes": None, "preprocess": {**GOOD, "std": [1, 1]}})
    with pytest.raises(UsageError, match=r"bad\.pt's 'preprocess' entry: mean and std must"):
        load_for_inference(str(tmp_path / "bad.pt"))


def test_records_compare_equal_however_their_numbers_were_given():
    a = Preprocess.small(32, 32, torch.tensor(MEAN, dtype=torch.float64), np.array(STD))
    assert a == Preprocess.small(np.int64(32), 32, tuple(MEAN), STD)
    assert isinstance(a.mean, tuple) and hash(a) == hash(Preprocess.small(32, 32, MEAN, STD))


# ----------------------------------------------------------------------------- transforms

def test_small_images_have_no_per_image_training_transform_or_ten_crop():
    pre = Preprocess.small(32, 32, MEAN, STD)
    with pytest.raises(UsageError, match="DeviceLoader"):
        pre.train_transform()
    with pytest.raises(UsageError, match="--ten-crop"):
        pre.eval_transform(ten_crop=True)


def test_a_record_without_normalisation_has_no_transform():
    with pytest.raises(UsageError, match="normalised"):
        Preprocess.small(32, 32, None, None).eval_transform()


def test_the_transforms_pickle_for_spawned_dataloader_workers(tmp_path):
    img = Image.fromarray(np.round(rgb_gradient((70, 90)) * 255).astype(np.uint8))
    for pre, kwargs in [(Preprocess.files(64, MEAN, STD), {"ten_crop": True}),
                        (Preprocess.files(64, MEAN, STD), {}),
                        (Preprocess.small(32, 64, MEAN, STD), {})]:
        transform = pre.eval_transform(**kwargs)
        torch.testing.assert_close(pickle.loads(pickle.dumps(transform))(img), transform(img),
                                   rtol=0, atol=0)
    pickle.dumps(Preprocess.files(64, MEAN, STD).train_transform())


def test_the_file_loader_keywords_build_the_same_record(tmp_path):
    for i in range(2):
        (tmp_path / "d" / str(i)).mkdir(parents=True)
        write("RGBA", tmp_path / "d" / str(i) / "0", (90, 100 + i))
    ds = data.open_dataset(tmp_path / "d")
    by_keywords = data.make_file_loader(ds.train, 2, train=False, mean=MEAN, std=STD,
                                        input_size=64, workers=0)
    by_record = data.make_file_loader(ds.train, 2, train=False,
                                      preprocess=Preprocess.files(64, MEAN, STD), workers=0)
    assert torch.equal(next(iter(by_keywords))[0], next(iter(by_record))[0])
    with pytest.raises(TypeError, match="not both"):
        data.make_file_loader(ds.train, 2, train=False, preprocess=Preprocess.files(64, MEAN, STD),
                              mean=MEAN, std=STD)


def test_the_device_loader_takes_mean_std_and_upscaling_from_the_record():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    part = data.ImageTensors(images, torch.arange(4))
    (a, _), = list(data.DeviceLoader(part, 4, preprocess=Preprocess.small(32, 48, MEAN, STD)))
    (b, _), = list(data.DeviceLoader(part, 4, mean=MEAN, std=STD, resize=48))
    assert a.shape == (4, 3, 48, 48) and torch.equal(a, b)
    with pytest.raises(TypeError, match="not both"):
        data.DeviceLoader(part, 4, preprocess=Preprocess.small(32, 32, MEAN, STD), mean=MEAN)
