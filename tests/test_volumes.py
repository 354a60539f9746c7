"""3-D volumes: reading NIfTI/NumPy (orientation, channels, bad files), preparation, the cache,
class folders and CSV manifests, the batch augmentation and the loader's streams, on tiny
volumes (a few voxels a side) so the file runs in seconds."""

import gzip
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densenet import volumes
from densenet.data import DeviceLoader, ImageTensors, _epoch_generator
from densenet.errors import UsageError
from densenet.volumes import (INTENSITY_MODES, VOLUME_EXTENSIONS, VolumeLoader, VolumeTensors,
                              augment_volumes, detect_volumes, is_volume_file, open_volumes,
                              prepare_volume, read_volume, synthetic_blobs, write_nifti)

import nibabel  # noqa: E402,F401  (the test extra installs it: the NIfTI tests need it)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _raises_naming(path, fn, *args, match=None, **kwargs) -> str:
    with pytest.raises(UsageError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert str(path) in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


# ----------------------------------------------------------------------------- reading

def test_extensions():
    assert VOLUME_EXTENSIONS == (".nii", ".nii.gz", ".npy", ".npz")
    assert INTENSITY_MODES == ("zscore", "percentile")
    assert is_volume_file("a/B.NII.GZ") and is_volume_file("x.nii") and is_volume_file("x.npz")
    assert not is_volume_file("x.gz") and not is_volume_file("x.png") and not is_volume_file("nii")


def test_nifti_identity_round_trip(tmp_path):
    a = _rand(5, 6, 7)
    p = write_nifti(tmp_path / "a.nii.gz", a)
    out = read_volume(p)
    assert out.dtype == np.float32 and out.shape == (1, 5, 6, 7)
    np.testing.assert_array_equal(out[0], a)
    # deterministic bytes: the gzip header holds no time
    first = p.read_bytes()
    write_nifti(p, a)
    assert p.read_bytes() == first
    np.testing.assert_array_equal(read_volume(write_nifti(tmp_path / "a.nii", a))[0], a)


def test_nifti_reoriented_reads_back_canonical(tmp_path):
    """An LPS-style file: stored axes (S, L, P) with 2 mm voxels. Read back, the data is in RAS+
    order, equal to the array it was made from; sizes differ per axis so a skipped
    reorientation cannot pass."""
    n0, n1, n2 = 3, 4, 5
    a = _rand(n0, n1, n2, seed=1)                       # canonical: a[i, j, k] at (R=i, A=j, S=k)
    stored = a[::-1, ::-1, :].transpose(2, 0, 1)        # stored[p, q, r] = a[n0-1-q, n1-1-r, p]
    affine = np.array([[0, -2.0, 0, 2.0 * (n0 - 1)],   # x = 2 * (n0 - 1 - q): q runs to the Left
                       [0, 0, -2.0, 2.0 * (n1 - 1)],   # y = 2 * (n1 - 1 - r): r runs Posterior
                       [2.0, 0, 0, 0],                  # z = 2 * p: p runs Superior
                       [0, 0, 0, 1]])
    p = write_nifti(tmp_path / "lps.nii.gz", stored, affine)
    out = read_volume(p)
    assert out.shape == (1, n0, n1, n2)
    np.testing.assert_array_equal(out[0], a)


def test_nifti_channels_last_become_first(tmp_path):
    import nibabel
    a = _rand(4, 5, 6, 3, seed=2)                      # NIfTI: (X, Y, Z, channels)
    nibabel.save(nibabel.Nifti1Image(a, np.eye(4)), str(tmp_path / "c.nii.gz"))
    out = read_volume(tmp_path / "c.nii.gz")
    assert out.shape == (3, 4, 5, 6)
    for c in range(3):
        np.testing.assert_array_equal(out[c], a[..., c])
    # write_nifti writes (C, D, H, W) channels last, read_volume gives them back
    b = _rand(2, 3, 4, 5, seed=3)
    np.testing.assert_array_equal(read_volume(write_nifti(tmp_path / "w.nii", b)), b)


def test_nifti_scaling_applied(tmp_path):
    import nibabel
    img = nibabel.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nibabel.save(img, str(tmp_path / "s.nii"))
    np.testing.assert_allclose(read_volume(tmp_path / "s.nii")[0],
                               np.arange(24).reshape(2, 3, 4) * 0.5 + 10)


def test_numpy_files(tmp_path):
    a = _rand(4, 5, 6)
    np.save(tmp_path / "a.npy", a.astype(np.float64))
    out = read_volume(tmp_path / "a.npy")
    assert out.dtype == np.float32 and out.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(out[0], a)
    b = _rand(2, 3, 4, 5)
    np.save(tmp_path / "b.npy", b)
    np.testing.assert_array_equal(read_volume(tmp_path / "b.npy"), b)
    np.save(tmp_path / "i.npy", np.arange(8, dtype=np.uint8).reshape(2, 2, 2))
    np.testing.assert_array_equal(read_volume(tmp_path / "i.npy")[0], np.arange(8).reshape(2, 2, 2))
    np.savez(tmp_path / "one.npz", anything=a)
    np.testing.assert_array_equal(read_volume(tmp_path / "one.npz")[0], a)
    np.savez_compressed(tmp_path / "two.npz", volume=b, mask=a > 0)
    np.testing.assert_array_equal(read_volume(tmp_path / "two.npz"), b)
    np.savez(tmp_path / "amb.npz", x=a, y=a)
    _raises_naming(tmp_path / "amb.npz", read_volume, tmp_path / "amb.npz", match="'volume'")


def test_numpy_files_need_no_nibabel(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    a = _rand(3, 4, 5)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(read_volume(tmp_path / "a.npy")[0], a)
    (tmp_path / "x.nii.gz").write_bytes(b"whatever")
    msg = _raises_naming(tmp_path / "x.nii.gz", read_volume, tmp_path / "x.nii.gz")
    assert "pip install 'densenet-torch[volumes]'" in msg and "pip install nibabel" in msg


def test_bad_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(os.urandom(600))
    _raises_naming(corrupt, read_volume, corrupt, match="corrupt")

    good = write_nifti(tmp_path / "good.nii.gz", _rand(16, 16, 16))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    _raises_naming(truncated, read_volume, truncated, match="truncated")
    # a .nii.gz of good gzip whose content is not NIfTI
    notnifti = tmp_path / "text.nii.gz"
    notnifti.write_bytes(gzip.compress(b"hello" * 100))
    _raises_naming(notnifti, read_volume, notnifti)

    np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.float32))
    _raises_naming(tmp_path / "flat.npy", read_volume, tmp_path / "flat.npy", match="(4, 5)")
    np.save(tmp_path / "five.npy", np.zeros((1, 2, 3, 4, 5), np.float32))
    _raises_naming(tmp_path / "five.npy", read_volume, tmp_path / "five.npy", match="(1, 2, 3, 4, 5)")
    import nibabel
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    _raises_naming(tmp_path / "flat.nii", read_volume, tmp_path / "flat.nii", match="(4, 5)")

    nan = _rand(3, 3, 3)
    nan[1, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    _raises_naming(tmp_path / "nan.npy", read_volume, tmp_path / "nan.npy", match="NaN")
    inf = _rand(3, 3, 3)
    inf[0, 0, 0] = np.inf
    write_nifti(tmp_path / "inf.nii.gz", inf)
    _raises_naming(tmp_path / "inf.nii.gz", read_volume, tmp_path / "inf.nii.gz", match="infinite")

    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.float32))
    _raises_naming(tmp_path / "empty.npy", read_volume, tmp_path / "empty.npy", match="empty")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _raises_naming(tmp_path / "obj.npy", read_volume, tmp_path / "obj.npy")
    np.save(tmp_path / "str.npy", np.array([["a"] * 2] * 2 * 2).reshape(2, 2, 2))
    _raises_naming(tmp_path / "str.npy", read_volume, tmp_path / "str.npy")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    _raises_naming(tmp_path / "broken.npz", read_volume, tmp_path / "broken.npz")
    _raises_naming(tmp_path / "missing.npy", read_volume, tmp_path / "missing.npy", match="does not exist")
    (tmp_path / "scan.png").write_bytes(b"x")
    _raises_naming(tmp_path / "scan.png", read_volume, tmp_path / "scan.png", match=".nii.gz")


# ----------------------------------------------------------------------------- preparation

def test_prepare_resize_and_zscore():
    a = np.stack([_rand(6, 7, 8, seed=4) * 5 + 3, _rand(6, 7, 8, seed=5) * 0.01 - 2])
    out = prepare_volume(a, (4, 4, 4), "zscore")
    assert out.dtype == torch.float32 and out.shape == (2, 4, 4, 4)
    resized = F.interpolate(torch.from_numpy(a)[None], size=(4, 4, 4), mode="trilinear",
                            align_corners=False)[0].double()
    for c in range(2):  # per channel, population std
        ref = (resized[c] - resized[c].mean()) / resized[c].std(correction=0)
        torch.testing.assert_close(out[c].double(), ref, rtol=1e-5, atol=1e-5)
        assert abs(float(out[c].mean())) < 1e-5 and abs(float(out[c].std(correction=0)) - 1) < 1e-4
    # same shape: no interpolation, so the values are exact
    same = prepare_volume(a[0], (6, 7, 8), "zscore")
    ref = (a[0].astype(np.float64) - a[0].mean(dtype=np.float64)) / a[0].std(dtype=np.float64)
    np.testing.assert_allclose(same[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    assert prepare_volume(np.full((1, 3, 3, 3), 7.0), (3, 3, 3), "zscore").abs().max() == 0
    assert prepare_volume(torch.ones(1, 4, 4, 4), 2, "zscore").shape == (1, 2, 2, 2)


def test_prepare_percentile():
    a = _rand(1, 10, 10, 10, seed=6)
    a[0, 0, 0, 0] = 1000.0   # a hot voxel: clipped, it does not squash the rest
    out = prepare_volume(a, (10, 10, 10), "percentile")
    lo, hi = np.percentile(a[0], [0.5, 99.5])
    ref = (np.clip(a[0], lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-5, atol=1e-6)
    assert float(out.min()) == 0 and float(out.max()) == pytest.approx(1)
    assert float(out[0, 0, 0, 0]) == pytest.approx(1)
    assert float(np.median(out.numpy())) > 0.3   # the bulk spans the range
    const = prepare_volume(np.full((2, 3, 3, 3), -4.0), (3, 3, 3), "percentile")
    assert const.shape == (2, 3, 3, 3) and const.abs().max() == 0


def test_prepare_errors():
    with pytest.raises(UsageError, match="zscore, percentile"):
        prepare_volume(np.zeros((1, 2, 2, 2)), (2, 2, 2), "minmax")
    for shape in [(2, 2), (2, 0, 2), "abc", (2.5, 2, 2)]:
        with pytest.raises(UsageError, match="three positive integers"):
            prepare_volume(np.zeros((1, 2, 2, 2)), shape, "zscore")
    with pytest.raises(UsageError, match="(2, 2)"):
        prepare_volume(np.zeros((2, 2)), (2, 2, 2), "zscore")


# ----------------------------------------------------------------------------- augmentation

def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def test_augment_flip_exact(device):
    x = torch.randn(16, 2, 3, 4, 5, device=device)
    out = augment_volumes(x, _gen(1, device), flip_axes=(2,))
    flips = torch.rand((16, 1), generator=_gen(1, device), device=device)[:, 0] < 0.5
    assert 0 < int(flips.sum()) < 16
    for i in range(16):  # each sample is itself or its W-mirror, as drawn
        torch.testing.assert_close(out[i], x[i].flip(-1) if flips[i] else x[i], rtol=0, atol=0)
    # several axes: column j of the draw is flip_axes[j]
    out = augment_volumes(x, _gen(2, device), flip_axes=(0, 2, 1))
    draws = torch.rand((16, 3), generator=_gen(2, device), device=device) < 0.5
    for i in range(16):
        dims = [1 + a for a, f in zip((0, 2, 1), draws[i].tolist()) if f]
        torch.testing.assert_close(out[i], x[i].flip(dims) if dims else x[i], rtol=0, atol=0)


def test_augment_pad_crop_exact():
    x = torch.randn(8, 2, 4, 5, 6)
    out = augment_volumes(x, _gen(3), pad=2)
    starts = torch.randint(0, 5, (8, 3), generator=_gen(3))
    padded = F.pad(x, (2,) * 6)
    for i in range(8):
        s0, s1, s2 = starts[i].tolist()
        torch.testing.assert_close(out[i], padded[i, :, s0:s0 + 4, s1:s1 + 5, s2:s2 + 6], rtol=0, atol=0)
    assert (starts != 2).any() and (out == 0).any()  # some shifted, zeros came in
    centred = augment_volumes(x, _gen(3), pad=0)
    assert centred is x


def test_augment_rot90_exact(device):
    x = torch.randn(16, 1, 3, 5, 5, device=device)
    out = augment_volumes(x, _gen(4, device), rotate_plane=(1, 2))
    ks = torch.randint(0, 4, (16,), generator=_gen(4, device), device=device)
    assert len(set(ks.tolist())) == 4
    for i in range(16):  # the sample's spatial axes 1, 2 are dims 2, 3 of (C, D, H, W)
        torch.testing.assert_close(out[i], torch.rot90(x[i], int(ks[i]), (2, 3)), rtol=0, atol=0)
    y = x.transpose(2, 4).contiguous()  # spatial (5, 5, 3); a plane given in reverse order
    out = augment_volumes(y, _gen(4, device), rotate_plane=(1, 0))
    for i in range(16):
        torch.testing.assert_close(out[i], torch.rot90(y[i], int(ks[i]), (2, 1)), rtol=0, atol=0)


def test_augment_all_three_compose_in_order():
    x = torch.randn(12, 2, 6, 6, 4)
    out = augment_volumes(x, _gen(5), flip_axes=(0, 2), pad=1, rotate_plane=(0, 1))
    g = _gen(5)
    flips = torch.rand((12, 2), generator=g) < 0.5
    starts = torch.randint(0, 3, (12, 3), generator=g)
    ks = torch.randint(0, 4, (12,), generator=g)
    for i in range(12):
        v = x[i].flip([1 + a for a, f in zip((0, 2), flips[i].tolist()) if f] or [])
        v = F.pad(v, (1,) * 6)
        s0, s1, s2 = starts[i].tolist()
        v = v[:, s0:s0 + 6, s1:s1 + 6, s2:s2 + 4]
        torch.testing.assert_close(out[i], torch.rot90(v, int(ks[i]), (1, 2)), rtol=0, atol=0)
    again = augment_volumes(x, _gen(5), flip_axes=(0, 2), pad=1, rotate_plane=(0, 1))
    assert torch.equal(out, again)
    other = augment_volumes(x, _gen(6), flip_axes=(0, 2), pad=1, rotate_plane=(0, 1))
    assert not torch.equal(out, other)
    assert augment_volumes(x.half(), _gen(5), flip_axes=(0, 2), pad=1,
                           rotate_plane=(0, 1)).dtype == torch.float16


def test_augment_errors():
    x = torch.zeros(2, 1, 3, 4, 4)
    g = _gen(0)
    with pytest.raises(UsageError, match="equal size"):
        augment_volumes(x, g, rotate_plane=(0, 1))
    for bad in [(3,), (0, 0), ("W",), 2]:
        with pytest.raises(UsageError, match="flip_axes"):
            augment_volumes(x, g, flip_axes=bad)
    for bad in [-1, 1.5, True]:
        with pytest.raises(UsageError, match="pad"):
            augment_volumes(x, g, pad=bad)
    for bad in [(1, 1), (1,), (1, 3), 1]:
        with pytest.raises(UsageError, match="rotate_plane"):
            augment_volumes(x, g, rotate_plane=bad)
    with pytest.raises(UsageError, match="float"):
        augment_volumes(torch.zeros(2, 3, 4, 4), g, pad=1)
    with pytest.raises(UsageError, match="float"):
        augment_volumes(torch.zeros(2, 1, 3, 4, 4, dtype=torch.long), g, pad=1)


# ----------------------------------------------------------------------------- loader

def _indexed(n, size=4):
    """Volume i is the constant i (exact in float16): the batch says which samples it holds."""
    images = torch.arange(n, dtype=torch.float16).view(n, 1, 1, 1, 1).expand(n, 1, size, size, size)
    return VolumeTensors(images.contiguous(), torch.arange(n))


def test_volume_tensors_keep_their_type():
    data = _indexed(6)
    sub = data.subset(torch.tensor([4, 1]))
    assert isinstance(sub, VolumeTensors) and sub.labels.tolist() == [4, 1]
    assert sub.images[:, 0, 0, 0, 0].tolist() == [4, 1]
    assert isinstance(data.to("cpu"), VolumeTensors) and len(data) == 6


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_streams_match_device_loader():
    data = _indexed(11)
    loader = VolumeLoader(data, 3, shuffle=True, seed=7)
    assert len(loader) == 4 and len(VolumeLoader(data, 3, drop_last=True)) == 3
    images = ImageTensors(torch.zeros(11, 3, 2, 2, dtype=torch.uint8), torch.arange(11))
    for epoch in (0, 1):
        batches = _epoch(loader, epoch)
        ref = _epoch(DeviceLoader(images, 3, shuffle=True, seed=7), epoch)
        assert [y.tolist() for _, y in batches] == [y.tolist() for _, y in ref]
        for x, y in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 4, 4, 4)
            assert x[:, 0, 0, 0, 0].long().tolist() == y.tolist()
    assert _epoch(loader, 0)[0][1].tolist() != _epoch(loader, 1)[0][1].tolist()
    plain = [y.tolist() for _, y in VolumeLoader(data, 4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_loader_sharding():
    data = _indexed(11)
    order = torch.randperm(11, generator=_epoch_generator(3, 2)).tolist()
    shards = []
    for rank in range(3):
        loader = VolumeLoader(data, 2, shuffle=True, seed=3, rank=rank, world_size=3)
        assert len(loader) == 2          # 11 // 3 = 3 samples each, in batches of 2
        got = sum((y.tolist() for _, y in _epoch(loader, 2)), [])
        assert got == order[rank:9:3]
        shards.append(set(got))
    assert set.union(*shards) == set(order[:9]) and sum(map(len, shards)) == 9


def test_loader_augmentation_reproducible():
    rng = torch.Generator().manual_seed(0)
    data = VolumeTensors(torch.randn(7, 2, 4, 4, 4, generator=rng).half(), torch.arange(7))
    augment = {"flip_axes": (0, 1, 2), "pad": 1, "rotate_plane": (1, 2)}
    loader = VolumeLoader(data, 3, shuffle=True, augment=augment, seed=5)
    first = _epoch(loader, 4)
    resumed = VolumeLoader(data, 3, shuffle=True, augment=augment, seed=5)
    for (x, y), (x2, y2) in zip(first, _epoch(resumed, 4)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # exactly: the order, then each batch's augmentation, from the (seed, epoch) generator
    g = _epoch_generator(5, 4)
    order = torch.randperm(7, generator=g)
    for i, (x, y) in enumerate(first):
        idx = order[i * 3:(i + 1) * 3]
        assert y.tolist() == idx.tolist()
        assert torch.equal(x, augment_volumes(data.images[idx].float(), g, **augment))
    assert not torch.equal(first[0][0], data.images[first[0][1]].float())


def test_loader_errors():
    data = _indexed(4)
    with pytest.raises(UsageError, match="batch size"):
        VolumeLoader(data, 0)
    with pytest.raises(UsageError, match="unknown keys 'scale'"):
        VolumeLoader(data, 2, augment={"scale": 2})
    with pytest.raises(UsageError, match="equal size"):
        VolumeLoader(VolumeTensors(torch.zeros(2, 1, 2, 3, 4), torch.zeros(2)), 2,
                     augment={"rotate_plane": (0, 1)})
    with pytest.raises(UsageError, match="dict"):
        VolumeLoader(data, 2, augment="flip")
    with pytest.raises(UsageError, match="VolumeTensors"):
        VolumeLoader(ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2)), 2)
    with pytest.raises(UsageError, match="rank"):
        VolumeLoader(data, 2, rank=2, world_size=2)


# ----------------------------------------------------------------------------- open_volumes

def _folder(root, n=3, size=6, seed=0):
    """ROOT/{cat,dog}/: NIfTI and NumPy files mixed; returns {path: label}."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, cls in enumerate(("cat", "dog")):
        for i in range(n):
            a = rng.standard_normal((size, size + 1, size + 2)).astype(np.float32) + label
            if i % 2:
                p = root / cls / f"{i}.npy"
                p.parent.mkdir(parents=True, exist_ok=True)
                np.save(p, a)
            else:
                p = write_nifti(root / cls / f"{i}.nii.gz", a)
            out[p] = label
    return out


def _expected(paths, shape=(4, 4, 4), intensity="zscore"):
    return torch.stack([prepare_volume(read_volume(p), shape, intensity).half() for p in paths])


def test_open_class_folders(tmp_path):
    files = _folder(tmp_path / "data")
    ds = open_volumes(tmp_path / "data", shape=(4, 4, 4))
    assert ds.name == "volumes" and ds.classes == ["cat", "dog"]
    assert isinstance(ds.train, VolumeTensors) and ds.val is None and ds.test is None
    assert ds.train.images.dtype == torch.float16 and ds.train.images.shape == (6, 1, 4, 4, 4)
    paths = sorted(files)  # class by class, files sorted
    assert ds.train.labels.dtype == torch.int64 and ds.train.labels.tolist() == [files[p] for p in paths]
    assert torch.equal(ds.train.images, _expected(paths))
    assert ds.channel_stats() == ([0.0], [1.0])
    assert not ds.multi_label
    assert isinstance(ds.train.subset(torch.tensor([0, 5])), VolumeTensors)


def test_open_train_val_test_folders(tmp_path):
    _folder(tmp_path / "d" / "train", n=2)
    _folder(tmp_path / "d" / "val", n=1, seed=1)
    test_files = _folder(tmp_path / "d" / "test", n=1, seed=2)
    ds = open_volumes(tmp_path / "d", shape=(3, 3, 3), intensity="percentile")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 2, 2)
    assert ds.test.labels.tolist() == [0, 1]
    assert torch.equal(ds.test.images, _expected(sorted(test_files), (3, 3, 3), "percentile"))
    (tmp_path / "d" / "val" / "bird").mkdir()
    np.save(tmp_path / "d" / "val" / "bird" / "b.npy", np.zeros((3, 3, 3)))
    _raises_naming(tmp_path / "d" / "val" / "bird", open_volumes, tmp_path / "d", shape=3,
                   match="class the training data does not have")


def test_open_csv_manifest(tmp_path):
    files = _folder(tmp_path / "scans")
    paths = sorted(files)
    lines = ["path,label"] + [f"{p.relative_to(tmp_path)},{['healthy', 'sick'][files[p]]}"
                              for p in reversed(paths)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    ds = open_volumes(tmp_path / "m.csv", shape=(4, 4, 4))
    assert ds.name == "volumes" and ds.classes == ["healthy", "sick"]
    assert ds.train.labels.tolist() == [files[p] for p in reversed(paths)]
    assert torch.equal(ds.train.images, _expected(list(reversed(paths))))
    assert detect_volumes(tmp_path / "m.csv")


def test_open_csv_multi_label_and_groups(tmp_path):
    files = sorted(_folder(tmp_path / "s", n=2))
    rows = ["Path,A,B,patient", f"{files[0]},1,0,p1", f"{files[1]},-1,1,p1",
            f"{files[2]},0,,p2", f"{files[3]},1,1,p3"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = open_volumes(tmp_path / "m.csv", shape=(2, 2, 2),
                      csv_options={"label_columns": ["A", "B"], "group_column": "patient"})
    assert ds.multi_label and ds.classes == ["A", "B"] and ds.groups == ["p1", "p1", "p2", "p3"]
    labels = ds.train.labels
    assert labels.dtype == torch.float32 and labels.shape == (4, 2)
    assert torch.isnan(labels[1, 0]) and labels[1, 1] == 1   # uncertain: not counted
    assert labels[2].tolist() == [0, 0] and labels[3].tolist() == [1, 1]


def test_open_errors(tmp_path):
    _raises_naming(tmp_path / "nope", open_volumes, tmp_path / "nope", shape=4, match="does not exist")
    (tmp_path / "empty").mkdir()
    _raises_naming(tmp_path / "empty", open_volumes, tmp_path / "empty", shape=4, match="class folders")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"")
    _raises_naming(tmp_path / "imgs" / "a", open_volumes, tmp_path / "imgs", shape=4, match="no volumes")
    _folder(tmp_path / "ok", n=1)
    with pytest.raises(UsageError, match="on_bad"):
        open_volumes(tmp_path / "ok", shape=4, on_bad="ignore")
    with pytest.raises(UsageError, match="zscore, percentile"):
        open_volumes(tmp_path / "ok", shape=4, intensity="max")
    with pytest.raises(UsageError, match="three positive integers"):
        open_volumes(tmp_path / "ok", shape=(4, 4))
    with pytest.raises(UsageError, match="csv_options"):
        open_volumes(tmp_path / "ok", shape=4, csv_options={"path_column": "p"})
    (tmp_path / "m.csv").write_text("path,label\nok/cat/0.nii.gz,a\n")
    with pytest.raises(UsageError, match="unknown keys 'column'"):
        open_volumes(tmp_path / "m.csv", shape=4, csv_options={"column": "p"})
    (tmp_path / "ok" / "dog" / "zz.npy").parent.mkdir(exist_ok=True)
    np.save(tmp_path / "ok" / "dog" / "zz.npy", np.zeros((2, 4, 4, 4), np.float32))
    _raises_naming(tmp_path / "ok" / "dog" / "zz.npy", open_volumes, tmp_path / "ok", shape=4,
                   match="channels")


def test_bad_volume_error_or_skip(tmp_path):
    files = _folder(tmp_path / "d")
    bad = tmp_path / "d" / "cat" / "9.nii.gz"
    bad.write_bytes(b"\x1f\x8b not a gzip stream")
    _raises_naming(bad, open_volumes, tmp_path / "d", shape=4)
    with pytest.warns(UserWarning, match="9.nii.gz") as record:
        ds = open_volumes(tmp_path / "d", shape=4, on_bad="skip")
    assert [str(bad) in str(w.message) for w in record].count(True) == 1
    assert all(w.filename == __file__ for w in record)  # the warning points at the caller
    assert len(ds.train) == 6 and torch.equal(ds.train.images, _expected(sorted(files)))
    assert ds.train.labels.tolist() == [files[p] for p in sorted(files)]
    # from the cache: still skipped, still said
    with pytest.warns(UserWarning, match="9.nii.gz") as record:
        again = open_volumes(tmp_path / "d", shape=4, on_bad="skip")
    assert all(w.filename == __file__ for w in record)
    assert torch.equal(again.train.images, ds.train.images)
    # a split with nothing readable left
    for p in files:
        p.write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="none of the 7 volumes of the train split"):
        open_volumes(tmp_path / "d", shape=4, on_bad="skip")


def test_csv_skip_missing_and_corrupt(tmp_path):
    files = sorted(_folder(tmp_path / "s", n=2))
    np.save(tmp_path / "s" / "nan.npy", np.full((3, 3, 3), np.nan))
    rows = ["path,label", f"{files[0]},a", "s/gone.npy,b", f"{files[1]},a", "s/nan.npy,b",
            f"{files[2]},b"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning) as record:
        ds = open_volumes(tmp_path / "m.csv", shape=2, on_bad="skip")
    said = " ".join(str(w.message) for w in record)
    assert "gone.npy" in said and "does not exist" in said and "nan.npy" in said and "NaN" in said
    assert ds.train.labels.tolist() == [0, 0, 1] and torch.equal(ds.train.images, _expected(files[:3], (2, 2, 2)))
    # without skip, read_csv's own check names the missing file first
    _raises_naming("gone.npy", open_volumes, tmp_path / "m.csv", shape=2)


def test_cache_used_then_rebuilt(tmp_path, monkeypatch):
    files = sorted(_folder(tmp_path / "d"))
    calls = []
    real = volumes.read_volume

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(volumes, "read_volume", counting)
    first = open_volumes(tmp_path / "d", shape=4)
    assert len(calls) == 6
    cache_files = list((tmp_path / "cache").glob("volumes-*.pt"))
    assert len(cache_files) == 1

    def refuse(path):
        raise AssertionError(f"read {path} again; the cache should have served it")
    monkeypatch.setattr(volumes, "read_volume", refuse)
    second = open_volumes(tmp_path / "d", shape=4)
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.train.labels, first.train.labels) and second.classes == first.classes
    assert isinstance(second.train, VolumeTensors) and second.channel_stats() == ([0.0], [1.0])

    monkeypatch.setattr(volumes, "read_volume", counting)
    calls.clear()
    open_volumes(tmp_path / "d", shape=(4, 4, 2))          # another shape: another cache entry
    open_volumes(tmp_path / "d", shape=4, intensity="percentile")
    assert len(calls) == 12 and len(list((tmp_path / "cache").glob("volumes-*.pt"))) == 3

    np.save(files[1], np.full((5, 5, 5), 3.0, np.float32) + _rand(5, 5, 5))  # a changed file
    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls.clear()
    changed = open_volumes(tmp_path / "d", shape=4)
    assert len(calls) == 6
    assert not torch.equal(changed.train.images[1], first.train.images[1])
    assert torch.equal(changed.train.images[0], first.train.images[0])
    assert len(list((tmp_path / "cache").glob("volumes-*.pt"))) == 3   # overwritten, not added

    for f in (tmp_path / "cache").glob("volumes-*.pt"):   # damaged cache files are rebuilt
        f.write_bytes(f.read_bytes()[:100])
    calls.clear()
    rebuilt = open_volumes(tmp_path / "d", shape=4)
    assert len(calls) == 6 and torch.equal(rebuilt.train.images, changed.train.images)


def test_cache_dir_argument(tmp_path):
    _folder(tmp_path / "d", n=1)
    open_volumes(tmp_path / "d", shape=2, cache_dir=tmp_path / "mine")
    assert len(list((tmp_path / "mine").glob("volumes-*.pt"))) == 1
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- detection, demo data

def test_detect_volumes(tmp_path):
    _folder(tmp_path / "vol", n=1)
    assert detect_volumes(tmp_path / "vol")
    _folder(tmp_path / "split" / "train", n=1)
    assert detect_volumes(tmp_path / "split")
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "1.png").write_bytes(b"")
    (tmp_path / "img" / "b").mkdir()
    (tmp_path / "img" / "b" / "1.npy").write_bytes(b"")
    assert not detect_volumes(tmp_path / "img")
    assert not detect_volumes(tmp_path / "missing") and not detect_volumes(tmp_path / "vol" / "cat" / "0.nii.gz")
    (tmp_path / "i.csv").write_text("Image Index,Finding Labels\nx.png,No Finding\n")
    assert not detect_volumes(tmp_path / "i.csv")
    (tmp_path / "v.csv").write_text("Path,label\n\nx.nii.gz,a\n")
    assert detect_volumes(tmp_path / "v.csv")
    (tmp_path / "c.csv").write_text("scan,label\nx.npz,a\n")
    assert not detect_volumes(tmp_path / "c.csv")
    assert detect_volumes(tmp_path / "c.csv", csv_options={"path_column": "scan"})


def test_synthetic_blobs_known_answer(tmp_path):
    root = synthetic_blobs(tmp_path / "blobs", n_per_class=4, size=12, seed=3)
    assert root == tmp_path / "blobs"
    for cls in ("left", "right"):
        files = sorted((root / cls).glob("*.nii.gz"))
        assert len(files) == 4
        for f in files:
            v = read_volume(f)[0]
            assert v.shape == (12, 12, 12)
            by_w = v.sum(axis=(0, 1))
            right = by_w[6:].sum() > by_w[:6].sum()
            assert right == (cls == "right"), (f, by_w)
            assert (int(np.argmax(by_w)) >= 6) == (cls == "right")
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in root.rglob("*.nii.gz")}
    synthetic_blobs(tmp_path / "blobs", n_per_class=4, size=12, seed=3)   # same: left untouched
    assert before == {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in root.rglob("*.nii.gz")}
    synthetic_blobs(tmp_path / "other", n_per_class=4, size=12, seed=3)
    assert all((tmp_path / "other" / f.relative_to(root)).read_bytes() == b for f, (b, _) in before.items())
    ds = open_volumes(root, shape=(8, 8, 8))
    assert ds.classes == ["left", "right"] and ds.train.labels.tolist() == [0] * 4 + [1] * 4
    with pytest.raises(UsageError, match="size"):
        synthetic_blobs(tmp_path / "x", size=2)


def test_no_warnings_on_clean_data(tmp_path):
    _folder(tmp_path / "d", n=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_volumes(tmp_path / "d", shape=3, on_bad="skip")
