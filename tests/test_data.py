"""Data loading: each official format on small generated copies, the device-side augmentation,
the hold-out split, the cache, downloads (offline only) and the errors a user can fix."""

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from densenet import data
from densenet.data import DeviceLoader, ImageFiles, ImageTensors, augment_batch, holdout_split, open_dataset
from densenet.errors import UsageError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- fixtures

def _rows(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the official CIFAR files do."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str8(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)
    dispatch[bytes] = _save_str8


def _pickle(obj) -> bytes:
    """A pickle like the official CIFAR files: protocol 2, Python 2 strings, numpy 1 names."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_cifar10(root: Path, per_batch=6, archive=False) -> Path:
    """The official layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta},
    dicts with bytes keys as the Python 2 pickles have."""
    files = {f"data_batch_{i}": {b"data": _rows(per_batch, i), b"labels": [(i + j) % 10 for j in range(per_batch)]}
             for i in range(1, 6)}
    files["test_batch"] = {b"data": _rows(4, 9), b"labels": [3, 1, 4, 1]}
    files["batches.meta"] = {b"label_names": [n.encode() for n in CIFAR10_NAMES]}
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        path = root / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, obj in files.items():
                blob = _pickle(obj)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return path
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, obj in files.items():
        (folder / name).write_bytes(_pickle(obj))
    return folder


def make_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{i:03d}" for i in range(100)]
    (folder / "train").write_bytes(_pickle({b"data": _rows(7, 1), b"fine_labels": [99, 0, 5, 5, 7, 8, 9],
                                            b"coarse_labels": [0] * 7}))
    (folder / "test").write_bytes(_pickle({b"data": _rows(3, 2), b"fine_labels": [1, 2, 3],
                                           b"coarse_labels": [0] * 3}))
    (folder / "meta").write_bytes(_pickle({b"fine_label_names": names, b"coarse_label_names": ["c"] * 20}))
    return folder


def _svhn_mat(path: Path, n: int, seed: int, labels=None):
    x = np.random.default_rng(seed).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array(labels if labels is not None else [(i % 10) + 1 for i in range(n)], dtype=np.uint8).reshape(n, 1)
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


def make_svhn(root: Path, extra=True) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = {"train": _svhn_mat(root / "train_32x32.mat", 5, 1, [10, 1, 2, 3, 4]),
           "test": _svhn_mat(root / "test_32x32.mat", 3, 2)}
    if extra:
        out["extra"] = _svhn_mat(root / "extra_32x32.mat", 4, 3)
    return out


def _save_image(path: Path, size, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def make_folder(root: Path, size=(8, 8), splits=("train", "val", "test"), classes=("cat", "dog")):
    for s in splits:
        for ci, c in enumerate(classes):
            for k in range(2):
                _save_image(root / s / c / f"{k}.png", size, (ci * 100, k * 50, 7))
    return root


# ----------------------------------------------------------------------------- CIFAR

def test_cifar10_folder_loads_with_shapes_labels_and_class_names(tmp_path):
    folder = make_cifar10(tmp_path)
    ds = open_dataset(folder)
    assert ds.name == "cifar10" and ds.classes == CIFAR10_NAMES and ds.small
    assert ds.train.images.shape == (30, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.dtype == torch.int64 and ds.train.labels[:6].tolist() == [1, 2, 3, 4, 5, 6]
    assert ds.test.labels.tolist() == [3, 1, 4, 1] and ds.val is None
    # rows are CHW: the first 1024 bytes are the red plane
    row = _rows(6, 1)[0]
    assert torch.equal(ds.train.images[0], torch.from_numpy(row.reshape(3, 32, 32)))


@pytest.mark.parametrize("where", ["archive", "archive_parent", "extracted_parent"])
def test_cifar10_archive_and_parent_folders_give_the_same_data(tmp_path, where):
    reference = open_dataset(make_cifar10(tmp_path / "ref"), cache_dir=tmp_path / "c1")
    if where == "extracted_parent":
        make_cifar10(tmp_path / "d")
        path = tmp_path / "d"
    else:
        archive = make_cifar10(tmp_path / "d", archive=True)
        path = archive if where == "archive" else archive.parent
    ds = open_dataset(path)
    assert ds.name == "cifar10" and ds.classes == reference.classes
    assert torch.equal(ds.train.images, reference.train.images)
    assert torch.equal(ds.test.labels, reference.test.labels)


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    ds = open_dataset(make_cifar100(tmp_path).parent)
    assert ds.name == "cifar100" and len(ds.classes) == 100 and ds.classes[99] == "class099"
    assert ds.train.labels.tolist() == [99, 0, 5, 5, 7, 8, 9]
    assert ds.train.images.shape == (7, 3, 32, 32) and ds.test.images.shape == (3, 3, 32, 32)


def test_cifar_of_another_kind_than_asked_is_refused(tmp_path):
    with pytest.raises(UsageError, match="holds cifar10 but cifar100"):
        open_dataset(make_cifar10(tmp_path), name="cifar100")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_cifar_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"refused to load .*data_batch_3.*system is not allowed"):
        open_dataset(folder)
    assert not (tmp_path / "pwned").exists()


def test_cifar_files_pickled_by_python_3_are_accepted_too():
    # protocol 5 pickles arrays through numpy's _frombuffer; protocol 2 bytes via _codecs.encode
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4, 5):
        got = data._unpickle(pickle.dumps({b"data": arr}, protocol=protocol), "x")
        assert np.array_equal(got["data"], arr)


def test_a_truncated_cifar_archive_is_reported_by_path(tmp_path):
    archive = make_cifar10(tmp_path, archive=True)
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UsageError, match=r"cifar-10-python\.tar\.gz is corrupt or truncated"):
        open_dataset(archive)


def test_a_truncated_cifar_batch_is_reported_by_path(tmp_path):
    folder = make_cifar10(tmp_path)
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[:100])
    with pytest.raises(UsageError, match=r"test_batch is corrupt or truncated"):
        open_dataset(folder)


# ----------------------------------------------------------------------------- SVHN

def test_svhn_loads_train_plus_extra_with_label_10_as_digit_0(tmp_path):
    made = make_svhn(tmp_path / "svhn")
    ds = open_dataset(tmp_path / "svhn")
    assert ds.name == "svhn" and ds.classes == [str(d) for d in range(10)]
    assert ds.train.images.shape == (9, 3, 32, 32) and ds.test.images.shape == (3, 3, 32, 32)
    assert ds.train.labels[:5].tolist() == [0, 1, 2, 3, 4]
    x = made["train"][0]
    assert torch.equal(ds.train.images[2], torch.from_numpy(x[:, :, :, 2].transpose(2, 0, 1).copy()))
    assert len(open_dataset(tmp_path / "svhn", svhn_extra=False).train) == 5


def test_svhn_without_extra_says_where_to_put_it(tmp_path):
    make_svhn(tmp_path, extra=False)
    with pytest.raises(UsageError, match=r"extra_32x32\.mat.*missing"):
        open_dataset(tmp_path)


def test_svhn_mat_of_the_wrong_shape_is_reported_by_path(tmp_path):
    make_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8),
                                                   "y": np.ones((2, 1), np.uint8)})
    with pytest.raises(UsageError, match=r"test_32x32\.mat does not hold SVHN data.*\(28, 28, 3, 2\)"):
        open_dataset(tmp_path)


def test_a_truncated_svhn_mat_is_reported_by_path(tmp_path):
    make_svhn(tmp_path)
    blob = (tmp_path / "train_32x32.mat").read_bytes()
    (tmp_path / "train_32x32.mat").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UsageError, match=r"train_32x32\.mat"):
        open_dataset(tmp_path)


# ----------------------------------------------------------------------------- class folders

def test_small_image_folder_with_splits_loads_as_tensors(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    ds = open_dataset(root)
    assert ds.name == "folder" and ds.small and ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (4, 3, 8, 8) and ds.val.images.shape == (4, 3, 8, 8)
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.test.labels.tolist() == [0, 0, 1, 1]
    assert ds.train.images[2, :, 0, 0].tolist() == [100, 0, 7]


def test_many_images_are_decoded_in_worker_processes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", classes=("a", "b", "c"))
    serial = open_dataset(root, cache_dir=tmp_path / "serial")
    monkeypatch.setattr(data, "_DECODE_CHUNK", 3)
    pooled = open_dataset(root, cache_dir=tmp_path / "pooled")
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(pooled, split).images, getattr(serial, split).images)
        assert torch.equal(getattr(pooled, split).labels, getattr(serial, split).labels)
    (root / "test" / "c" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UsageError, match=r"test/c/1\.png is corrupt"):
        open_dataset(root, cache_dir=tmp_path / "pooled")


def test_grey_and_rgba_images_become_rgb(tmp_path):
    root = tmp_path / "modes"
    root.joinpath("a").mkdir(parents=True)
    Image.new("L", (8, 8), 90).save(root / "a" / "grey.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(root / "a" / "rgba.png")
    ds = open_dataset(root)
    assert ds.train.images.shape == (2, 3, 8, 8)
    assert ds.train.images[:, :, 0, 0].tolist() == [[90, 90, 90], [1, 2, 3]]


def test_folder_of_class_folders_without_splits(tmp_path):
    root = tmp_path / "flat"
    for c in ("b", "a"):
        _save_image(root / c / "x.jpg", (32, 32), (10, 20, 30))
    ds = open_dataset(root)
    assert ds.classes == ["a", "b"] and len(ds.train) == 2 and ds.val is None and ds.test is None


def test_val_and_test_classes_map_by_name(tmp_path):
    root = make_folder(tmp_path / "imgs", splits=("train",), classes=("a", "b", "c"))
    _save_image(root / "test" / "c" / "0.png", (8, 8), (1, 2, 3))
    ds = open_dataset(root)
    assert ds.test.labels.tolist() == [2]


def test_an_unknown_class_in_test_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs", splits=("train",))
    _save_image(root / "test" / "zebra" / "0.png", (8, 8), (1, 2, 3))
    with pytest.raises(UsageError, match=r"zebra is a class the training data does not have"):
        open_dataset(root)


def test_an_empty_class_folder_is_reported_by_path(tmp_path):
    root = make_folder(tmp_path / "imgs", splits=("train",))
    (root / "train" / "empty").mkdir()
    with pytest.raises(UsageError, match=r"class folder .*train/empty holds no images"):
        open_dataset(root)


def test_a_jpeg_cut_in_half_is_reported_by_path(tmp_path):
    root = make_folder(tmp_path / "imgs", splits=("train",))
    bad = root / "train" / "dog" / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UsageError, match=r"dog/cut\.jpg is corrupt or truncated"):
        open_dataset(root)


def test_small_images_of_different_sizes_name_the_odd_file(tmp_path):
    root = make_folder(tmp_path / "imgs", splits=("train",))
    _save_image(root / "train" / "dog" / "z.png", (16, 8), (0, 0, 0))
    with pytest.raises(UsageError, match=r"z\.png is 16x8 pixels"):
        open_dataset(root)


def test_large_images_become_files_for_a_dataloader(tmp_path):
    root = make_folder(tmp_path / "big", size=(80, 70), splits=("train", "val"))
    ds = open_dataset(root)
    assert ds.name == "imagenet" and not ds.small and isinstance(ds.train, ImageFiles)
    assert [Path(p).name for p, _ in ds.train.samples] == ["0.png", "1.png"] * 2
    assert [y for _, y in ds.val.samples] == [0, 0, 1, 1]
    assert ds.channel_stats() == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert len(ds.train.subset(torch.tensor([3, 0]))) == 2

    loader = data.make_file_loader(ds.val, 3, train=False, mean=[0.5] * 3, std=[0.5] * 3,
                                   input_size=32, resize=40, workers=0)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 1, 1]
    train_loader = data.make_file_loader(ds.train, 2, train=True, mean=[0.5] * 3, std=[0.5] * 3,
                                         input_size=32, workers=0, seed=3, world_size=2, rank=1)
    assert len(train_loader) == 1 and next(iter(train_loader))[0].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_large_image_is_reported_by_path_when_read(tmp_path, workers):
    root = make_folder(tmp_path / "big", size=(80, 80), splits=("train",))
    bad = root / "train" / "dog" / "1.png"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    ds = open_dataset(root)
    loader = data.make_file_loader(ds.train, 4, train=False, mean=[0.5] * 3, std=[0.5] * 3,
                                   input_size=32, resize=40, workers=workers)
    with pytest.raises(UsageError, match=r"dog/1\.png is corrupt or truncated") as e:
        list(loader)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(bad))


def test_file_loader_order_is_reproducible_per_epoch_and_sharded(tmp_path):
    root = tmp_path / "big"
    for c in range(6):
        _save_image(root / f"c{c}" / "0.png", (72, 72), (c, c, c))
    ds = open_dataset(root)

    def epoch_labels(epoch, rank=0, world=1):
        loader = data.make_file_loader(ds.train, 2, train=True, mean=[0.5] * 3, std=[0.5] * 3,
                                       input_size=16, workers=0, seed=5, rank=rank, world_size=world)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert epoch_labels(1) == epoch_labels(1) and sorted(epoch_labels(1)) == list(range(6))
    assert epoch_labels(1) != epoch_labels(2)
    shards = [epoch_labels(1, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])


# ----------------------------------------------------------------------------- errors

def test_a_missing_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"does not exist.*CIFAR-10/100.*SVHN.*class-per-folder"):
        open_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["file", "dir"])
def test_a_wrong_format_lists_the_formats_understood(tmp_path, content):
    if content == "file":
        path = tmp_path / "data.npz"
        path.write_bytes(b"not a data set")
    else:
        path = tmp_path / "d"
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    expected = r"is not a data set this program reads.*CIFAR-10/100.*SVHN.*class-per-folder"
    with pytest.raises(UsageError, match=expected) as e:
        open_dataset(path)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- cache

def test_the_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", splits=("train",))
    first = open_dataset(root)
    cached = list((tmp_path / "cache").glob("folder-*.pt"))
    assert len(cached) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(data, "_decode_all", no_decode)
    again = open_dataset(root)
    assert torch.equal(again.train.images, first.train.images) and again.classes == first.classes

    monkeypatch.undo()
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    _save_image(root / "train" / "cat" / "new.png", (8, 8), (255, 255, 255))
    changed = open_dataset(root)
    assert len(changed.train) == 5
    assert list((tmp_path / "cache").glob("folder-*.pt")) == cached  # overwritten, not added


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    folder = make_cifar10(tmp_path)
    first = open_dataset(folder)
    for f in (tmp_path / "cache").glob("*.pt"):
        f.write_bytes(b"garbage")
    assert torch.equal(open_dataset(folder).train.images, first.train.images)


def test_a_read_only_cache_directory_still_loads(tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        ds = open_dataset(make_cifar10(tmp_path), cache_dir=cache)
    finally:
        cache.chmod(0o700)
    assert len(ds.train) == 30


# ----------------------------------------------------------------------------- hold-out

def test_the_holdout_split_is_deterministic_from_the_seed():
    train, val = holdout_split(100, 10, seed=7)
    train2, val2 = holdout_split(100, 10, seed=7)
    torch.manual_seed(123)  # global RNG state does not matter
    assert torch.equal(val, val2) and torch.equal(train, train2)
    assert torch.equal(val, holdout_split(100, 10, seed=7)[1])
    assert not torch.equal(val, holdout_split(100, 10, seed=8)[1])
    assert len(val) == 10 and len(train) == 90
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    assert torch.equal(val, val.sort().values)


def test_holdout_larger_than_the_data_is_refused():
    with pytest.raises(UsageError):
        holdout_split(5, 6, seed=0)


def test_channel_stats_are_per_channel_on_the_unit_scale():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255
    images[0, 2] = 255
    ds = data.Dataset("folder", ["a"], ImageTensors(images, torch.zeros(2, dtype=torch.long)), None, None)
    mean, std = ds.channel_stats()
    assert mean == pytest.approx([1.0, 0.0, 0.5]) and std == pytest.approx([0.0, 0.0, 0.5])


# ----------------------------------------------------------------------------- augmentation

def test_augment_batch_is_a_zero_padded_crop_and_an_optional_mirror():
    x = torch.randn(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, pad=4)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen_flip = seen_plain = 0
    for i in range(len(x)):
        crops = {(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))}
        assert crops, f"image {i} is not a crop of the padded image"
        seen_flip += any(f for *_, f in crops)
        seen_plain += any(not f for *_, f in crops)
    assert seen_flip > 10 and seen_plain > 10
    # replaying the generator gives the same batch
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))


def test_augmentation_shifts_cover_the_full_range():
    x = torch.zeros(2000, 1, 4, 4)
    x[:, :, 0, 0] = 1  # a marker pixel: its new place gives the shift (flip folds x)
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    rows = out.flatten(2).argmax(-1).squeeze(1) // 4
    present = out.flatten(1).amax(1) > 0
    assert set(rows[present].tolist()) == {0, 1, 2}
    assert (~present).sum() > 0  # shifted out of the frame: zeros came in


def test_device_loader_normalises_and_pads_with_the_mean_colour():
    images = torch.full((4, 3, 8, 8), 200, dtype=torch.uint8)
    d = ImageTensors(images, torch.arange(4))
    mean, std = [200 / 255] * 3, [0.5] * 3
    (x, y), = list(DeviceLoader(d, 4, shuffle=False, augment=False, mean=mean, std=std))
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-6) and y.tolist() == [0, 1, 2, 3]
    images[:, :, 0, 0] = 255
    (x, _), = list(DeviceLoader(ImageTensors(images, torch.arange(4)), 4, mean=mean, std=std))
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 200 / 255) / 0.5)


def test_device_loader_epochs_are_reproducible_and_differ():
    d = ImageTensors(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    kw = dict(shuffle=True, augment=True, mean=[0.5] * 3, std=[0.25] * 3, seed=3)
    a = DeviceLoader(d, 16, **kw)
    a.set_epoch(2)
    torch.manual_seed(0)
    ya = [y for _, y in a]
    xa = [x for x, _ in a]
    b = DeviceLoader(d, 16, **kw)
    b.set_epoch(2)
    torch.manual_seed(99)
    assert all(torch.equal(p, q) for p, q in zip(xa, [x for x, _ in b]))
    assert [y.tolist() for y in ya] == [y.tolist() for _, y in b]
    assert len(a) == 4 and [len(y) for y in ya] == [16, 16, 16, 2]
    assert sorted(torch.cat(ya).tolist()) == list(range(50))
    b.set_epoch(3)
    assert [y.tolist() for _, y in b] != [y.tolist() for y in ya]


def test_device_loader_shards_equally_across_ranks():
    d = ImageTensors(torch.zeros(23, 3, 4, 4, dtype=torch.uint8), torch.arange(23))
    shards = []
    for rank in range(3):
        loader = DeviceLoader(d, 4, shuffle=True, augment=False, seed=1, rank=rank, world_size=3)
        loader.set_epoch(5)
        shards.append(torch.cat([y for _, y in loader]).tolist())
        assert len(loader) == 2
    assert [len(s) for s in shards] == [7, 7, 7]
    assert len(set(sum(shards, []))) == 21


def test_device_loader_drop_last_and_channels_last():
    d = ImageTensors(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10))
    loader = DeviceLoader(d, 4, shuffle=False, augment=True, drop_last=True, channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_subset_and_to_keep_images_and_labels_together():
    d = ImageTensors(torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous(),
                     torch.arange(5))
    s = d.subset(torch.tensor([4, 1])).to("cpu")
    assert s.labels.tolist() == [4, 1] and s.images[:, 0, 0, 0].tolist() == [4, 1]
    assert s.images.is_contiguous()


# ----------------------------------------------------------------------------- download

def test_download_offline_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_URL", "http://127.0.0.1:9/")
    monkeypatch.setitem(data.DOWNLOADS, "cifar10",
                        [("http://127.0.0.1:9/", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")])
    with pytest.raises(UsageError, match=r"could not download http://127\.0\.0\.1:9/cifar-10-python\.tar\.gz"
                                         r".*put it at .*cifar-10-python\.tar\.gz"):
        open_dataset(tmp_path / "cifar", download=True, name="cifar10")
    assert not list((tmp_path / "cifar").glob("*.part"))


def test_download_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    make_cifar10(src, archive=True)
    monkeypatch.setitem(data.DOWNLOADS, "cifar10",
                        [(src.as_uri() + "/", "cifar-10-python.tar.gz", "0" * 32)])
    with pytest.raises(UsageError, match=r"md5 .* not the published 0{32}"):
        open_dataset(tmp_path / "cifar", download=True, name="cifar10")
    assert not (tmp_path / "cifar" / "cifar-10-python.tar.gz").exists()


def test_download_with_the_right_checksum_loads(tmp_path, monkeypatch):
    import hashlib
    src = tmp_path / "mirror"
    archive = make_cifar10(src, archive=True)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", [(src.as_uri() + "/", archive.name, md5)])
    ds = open_dataset(tmp_path / "cifar", download=True, name="cifar10")
    assert ds.name == "cifar10" and len(ds.train) == 30
    assert (tmp_path / "cifar" / "cifar-10-python.tar.gz").is_file()


def test_download_completes_a_partly_present_svhn_folder(tmp_path, monkeypatch):
    import hashlib
    mirror = tmp_path / "mirror"
    make_svhn(mirror)
    entries = [(mirror.as_uri() + "/", f, hashlib.md5((mirror / f).read_bytes()).hexdigest())
               for f in ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat")]
    monkeypatch.setitem(data.DOWNLOADS, "svhn", entries)
    target = tmp_path / "svhn"
    target.mkdir()
    (target / "train_32x32.mat").write_bytes((mirror / "train_32x32.mat").read_bytes())
    ds = open_dataset(target, download=True, name="svhn")
    assert len(ds.train) == 9 and len(ds.test) == 3


def test_download_needs_a_known_name(tmp_path):
    with pytest.raises(UsageError, match="--download"):
        open_dataset(tmp_path, download=True)
