"""Occlusion sensitivity: the maps against covering every patch by hand, the patch grid, the
multi-label maps of one pass, and mistakes in the patch or the method."""

import pytest
import torch

from densenet.cam import occlusion
from densenet.errors import UsageError
from densenet.model import densenet_cifar
from densenet.occlusion import check_patch, default_patch, occlusion_maps, patch_boxes


def measured_model(spatial_dims, num_classes=3):
    """A random DenseNet-BC (L=10, k=4) with BN statistics of real batches, in float64 so the
    comparison with a hand computation is exact to rounding."""
    torch.manual_seed(0)
    model = densenet_cifar(10, growth_rate=4, spatial_dims=spatial_dims, in_channels=2,
                           num_classes=num_classes).double()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 2, *(8,) * spatial_dims, dtype=torch.float64))
    return model.eval()


def by_hand(model, x, cls, patch, stride, multi_label=False):
    """Occlusion written out: every start along every axis (the last one flush with the border),
    the patch set to the input's per-channel mean, the fall in probability added to every voxel
    under the patch, averaged, its positive part divided by its maximum."""
    spatial = x.shape[1:]
    starts = []
    for s, p, st in zip(spatial, patch, stride):
        axis = list(range(0, s - p + 1, st))
        starts.append(axis + ([s - p] if axis[-1] != s - p else []))
    score = (lambda z: z.sigmoid()) if multi_label else (lambda z: z.softmax(1))
    with torch.no_grad():
        full = score(model(x[None]))[0, cls]
        total, count = torch.zeros(spatial, dtype=x.dtype), torch.zeros(spatial, dtype=x.dtype)
        for corner in torch.cartesian_prod(*[torch.tensor(a) for a in starts]).reshape(-1, len(spatial)):
            box = tuple(slice(int(c), int(c) + p) for c, p in zip(corner, patch))
            covered = x.clone()
            for ch in range(x.shape[0]):
                covered[ch][box] = x[ch].mean()
            total[box] += full - score(model(covered[None]))[0, cls]
            count[box] += 1
    m = torch.relu(total / count)
    return m / m.max() if m.max() > 0 else m


@pytest.mark.parametrize("spatial,patch,stride", [((7, 9, 6), (3, 4, 2), (2, 3, 2)),
                                                  ((11, 10), (4, 4), (3, 2)), ((13,), (5,), (4,))],
                         ids=["3d", "2d", "1d"])
def test_the_maps_equal_covering_every_patch_by_hand(spatial, patch, stride):
    model = measured_model(len(spatial))
    x = torch.randn(2, 2, *spatial, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = occlusion(model, x, target=[2, 0], patch=patch, stride=stride, batch_size=5)
    assert result.cams.shape == (2, *spatial) and result.classes.tolist() == [2, 0]
    peaks = []
    for i, c in enumerate([2, 0]):
        expected = by_hand(model, x[i], c, patch, stride)
        peaks.append(float(expected.max()))
        torch.testing.assert_close(result.cams[i].double(), expected, rtol=0, atol=1e-6)
    assert 1.0 in peaks  # not only all-zero maps
    with torch.no_grad():
        torch.testing.assert_close(result.probs.double(), model(x).softmax(1), rtol=0, atol=1e-6)


def test_one_pass_gives_every_label_of_a_multi_label_model():
    model = measured_model(3, num_classes=4)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    maps, probs = occlusion_maps(model, x, [3, 1], patch=2, stride=2, multi_label=True)
    assert maps.shape == (2, 6, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(probs.double(), model(x[None])[0].sigmoid(), rtol=0, atol=1e-6)
    for k, c in enumerate([3, 1]):
        torch.testing.assert_close(maps[k].double(), by_hand(model, x, c, (2,) * 3, (2,) * 3, True),
                                   rtol=0, atol=1e-6)


def test_the_model_is_left_in_its_mode_and_untouched():
    model = measured_model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    occlusion(model, torch.randn(1, 2, 8, 8, dtype=torch.float64), patch=4)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_patches_cover_every_voxel_and_the_last_ends_at_the_border():
    assert patch_boxes((10,), (4,), (3,)) == [(slice(0, 4),), (slice(3, 7),), (slice(6, 10),)]
    assert patch_boxes((11,), (4,), (3,)) == [(slice(0, 4),), (slice(3, 7),), (slice(6, 10),),
                                             (slice(7, 11),)]
    assert patch_boxes((3, 2), (3, 2), (1, 1)) == [(slice(0, 3), slice(0, 2))]
    boxes = patch_boxes((16, 16, 16), (4,) * 3, (2,) * 3)
    assert len(boxes) == 7 ** 3
    assert default_patch((16, 16, 16)) == (4, 4, 4) and default_patch((96, 96, 97)) == (24, 24, 25)
    assert default_patch((224, 224)) == (28, 28) and default_patch((3,)) == (1,)
    assert check_patch((16, 16, 16), None, None) == ((4, 4, 4), (2, 2, 2))
    assert check_patch((16, 8), 5, (1, 3)) == ((5, 5), (1, 3))


@pytest.mark.parametrize("patch,stride,message", [
    (9, None, r"patch \(9, 9, 9\) is larger than the model input \(8, 8, 8\); give at most 8"),
    (0, None, "patch must be a whole number of voxels >= 1"),
    ((2, 2), None, r"one per axis, 3 of them\), got \(2, 2\)"),
    (2.5, None, "got 2.5"),
    (True, None, "got True"),
    (2, 0, "stride must be a whole number"),
    (2, (2, 3, 2), r"stride \(2, 3, 2\) is longer than the patch \(2, 2, 2\)"),
])
def test_a_bad_patch_or_stride_is_a_usage_error_before_any_work(patch, stride, message):
    model = measured_model(3)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UsageError, match=message):
        occlusion(model, torch.zeros(1, 2, 8, 8, 8, dtype=torch.float64), patch=patch, stride=stride)
    assert not calls


def test_an_input_of_the_wrong_dimension_or_a_bad_target_is_a_usage_error():
    model = measured_model(3)
    with pytest.raises(UsageError, match=r"volumes \(N, C, D, H, W\) for this 3-D model"):
        occlusion(model, torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    with pytest.raises(UsageError, match="out of range"):
        occlusion(model, torch.zeros(1, 2, 8, 8, 8, dtype=torch.float64), target=3)
