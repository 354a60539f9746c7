"""Models for signals and volumes (``spatial_dims`` 1 and 3): MONAI's DenseNets as the
reference (parameter counts, state dicts, outputs, multiply-adds), I3D inflation of 2-D
weights (Carreira and Zisserman, CVPR 2017), the backbone's feature maps in 1-D and 3-D.

Everything is small (3-D inputs of 32^3 at most) so the file runs in well under two minutes on
a CPU; the parameter and MAC counts use models on the ``meta`` device (no memory, no
arithmetic)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import monai.networks.nets as monai_nets  # noqa: E402  (the test extra installs monai)

from densenet import DenseNet, UsageError, create_model  # noqa: E402
from densenet.model import count_macs, count_parameters  # noqa: E402
from densenet.weights import (adapt_input_channels, canonical_key, inflate_state_dict,  # noqa: E402
                              inflate_weight, load_pretrained, load_strict, load_weights_into)

MONAI = {"densenet121": monai_nets.DenseNet121, "densenet169": monai_nets.DenseNet169,
         "densenet201": monai_nets.DenseNet201, "densenet264": monai_nets.DenseNet264}
SIDE = {1: 64, 2: 32, 3: 32}  # input side per spatial_dims: the last block at 2, 1 and 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: intra-op threads gain little on them and, on a machine other
    work keeps busy, cost up to several times the run time. One thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _input(spatial_dims: int, in_channels: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, *[SIDE[spatial_dims]] * spatial_dims, generator=g,
                       dtype=torch.float64)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BN's affine parameters and running statistics, and the classifier's bias, drawn at
    random (of a scale that keeps 100+ layers' activations finite), so that a BN or a head
    that loaded nothing, or the wrong tensor, shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=g)))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=g))
    return model


def _monai(name: str, spatial_dims: int, in_channels: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize(MONAI[name](spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2),
                      seed).double()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


# ----------------------------------------------------------------------------- MONAI


@pytest.mark.parametrize("name", list(MONAI))
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_parameters_and_state_dict_shapes_are_monais(name, spatial_dims, in_channels):
    with torch.device("meta"):
        ours = create_model(name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=2)
        theirs = MONAI[name](spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2)
    assert count_parameters(ours) == count_parameters(theirs)
    # the same tensors under the mapped names: every key, shape and buffer
    want = {canonical_key(k): tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want


@pytest.mark.parametrize("name, spatial_dims", [("densenet121", 1), ("densenet121", 2),
                                                ("densenet121", 3), ("densenet169", 2)])
def test_monai_weights_load_strictly_and_give_monais_outputs(tmp_path, name, spatial_dims):
    """MONAI's state dict loads strictly (``load_state_dict``, and ``create_model(weights=)``
    from a file); both implementations then compute MONAI's function in evaluation mode and
    in training mode (batch statistics; the running statistics updated alike)."""
    in_channels = 3 if spatial_dims == 2 else 1
    theirs = _monai(name, spatial_dims, in_channels)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    assert any(".layers.norm1." in k for k in state) and "class_layers.out.weight" in state
    path = tmp_path / "monai.pth"
    torch.save(theirs.state_dict(), path)
    # Training mode normalises by batch statistics; with the last block at 1x1 (1x1x1) a batch
    # of 2 gives BN two values per channel, where rounding differences are amplified without
    # bound (the output is about the sign of their difference): train on 4.
    x, x_train = _input(spatial_dims, in_channels, batch=1), _input(spatial_dims, in_channels, batch=4)
    with torch.no_grad():
        want_eval = theirs.eval()(x)
        want_train = theirs.train()(x_train)
    assert want_train.std() > 0.1 and torch.isfinite(want_eval).all()  # not a degenerate comparison
    after = {canonical_key(k): v for k, v in theirs.state_dict().items()}

    direct = create_model(name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=2,
                          implementation="efficient").double()
    direct.load_state_dict(state, strict=True)  # the model maps MONAI's names itself
    from_file = create_model(name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=2,
                             implementation="reference", weights=str(path)).double()
    loaded = direct.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in from_file.state_dict().items())
    backbone = create_model(name, spatial_dims=spatial_dims, in_channels=in_channels,
                            features_only=True, weights=str(path))  # MONAI's head ignored
    assert all(torch.equal(v, loaded[k].float() if v.is_floating_point() else loaded[k])
               for k, v in backbone.state_dict().items())

    for model in (direct, from_file):  # efficient, reference
        with torch.no_grad():
            _close(model.eval()(x), want_eval)
            _close(model.train()(x_train), want_train)
        for k, v in model.state_dict().items():
            if "running_" in k:
                torch.testing.assert_close(v, after[k], rtol=1e-9, atol=1e-12, msg=k)
            else:
                assert torch.equal(v, after[k]), k


def test_a_monai_file_fine_tunes_through_load_pretrained(tmp_path):
    """The --weights path: MONAI's head is kept for as many classes, replaced for others."""
    theirs = _monai("densenet121", 1, 1)
    torch.save(theirs.state_dict(), tmp_path / "monai1d.pth")
    model = create_model("densenet121", spatial_dims=1, in_channels=1, num_classes=2)
    new_head, line = load_pretrained(model, tmp_path / "monai1d.pth", ["a", "b"])
    assert not new_head and "kept the classifier" in line
    torch.testing.assert_close(model.classifier.weight, theirs.class_layers.out.weight.float())
    model = create_model("densenet121", spatial_dims=1, in_channels=3, num_classes=3)
    new_head, line = load_pretrained(model, tmp_path / "monai1d.pth", ["a", "b", "c"])
    assert new_head and "the file has 2 classes, the data 3" in line
    torch.testing.assert_close(model.features.conv0.weight,  # one channel repeated, scaled by 1/3
                               theirs.features.conv0.weight.float().expand(-1, 3, -1) / 3)
    torch.testing.assert_close(model.features.norm5.running_var, theirs.features.norm5.running_var.float())


# ----------------------------------------------------------------------------- inflation


def _small_2d(**kw) -> DenseNet:
    """A DenseNet-BC with the ImageNet stem (7x7/2 conv, 3x3/2 max-pool), transitions and
    bottlenecks: every kind of layer DenseNet-121 has, at a fraction of the cost."""
    args = dict(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=5,
                implementation="reference")
    return DenseNet(**{**args, **kw})


def _circular(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.padding_mode = "circular"
    return model


def test_inflation_rule():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    w3 = inflate_weight(w, 5)
    assert w3.shape == (4, 3, 5, 3, 3) and w3.is_contiguous()
    assert all(torch.equal(w3[:, :, i], w / 5) for i in range(5))
    torch.testing.assert_close(w3.sum(2), w, rtol=1e-15, atol=1e-15)
    two_d = _small_2d()
    three_d = _small_2d(spatial_dims=3)
    state = two_d.state_dict()
    inflated = inflate_state_dict(state, three_d)
    assert inflated.keys() == state.keys()
    own = three_d.state_dict()
    for k, v in inflated.items():
        assert v.shape == own[k].shape, k
        if v.dim() == 5:
            assert torch.equal(v, inflate_weight(state[k], v.shape[2])), k
        else:  # BN, the classifier, counters: the very tensors
            assert v is state[k], k
    # the model's state dict works as the target as well as the model
    assert all(torch.equal(inflated[k], v) for k, v in inflate_state_dict(state, own).items())
    # weights that already fit are left alone
    assert all(inflate_state_dict(inflated, own)[k] is v for k, v in inflated.items())


def test_inflated_model_on_a_volume_constant_along_depth_gives_the_2d_logits():
    """The known answer of I3D inflation. With zero padding the slices near the ends of the
    depth axis see zeros where the 2-D model sees nothing, so every convolution of both models
    pads circularly: along depth a constant volume then wraps onto itself, in height and width
    both models pad alike, and the 3-D logits equal the 2-D logits on one slice exactly (up to
    rounding). Max-pooling pads with -inf, which never wins, and BN (eval: running statistics;
    train: batch statistics) sees each 2-D value repeated D times: the same mean and variance."""
    torch.manual_seed(0)
    two_d = _circular(_randomize(_small_2d(in_channels=3), seed=1).double())
    three_d = _circular(_small_2d(in_channels=3, spatial_dims=3).double())
    three_d.load_state_dict(inflate_state_dict(two_d.state_dict(), three_d), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    volume = x.unsqueeze(2).expand(-1, -1, 16, -1, -1).contiguous()
    for train in (False, True):
        two_d.train(train)
        three_d.train(train)
        with torch.no_grad():
            want, got = two_d(x), three_d(volume)
        assert want.std() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    # zero padding, as the models come: the boundary slices make the logits differ
    for m in (two_d, three_d):
        for c in m.modules():
            if isinstance(c, nn.modules.conv._ConvNd):
                c.padding_mode = "zeros"
    with torch.no_grad():
        assert (three_d.eval()(volume) - two_d.eval()(x)).abs().max() > 1e-6


def test_inflation_and_channel_adaptation_commute():
    state = _small_2d().state_dict()  # RGB
    grey_3d = _small_2d(spatial_dims=3, in_channels=1)
    key = "features.conv0.weight"
    a = adapt_input_channels(inflate_state_dict(state, grey_3d), 1, key)
    b = inflate_state_dict(adapt_input_channels(state, 1, key), grey_3d)
    assert a[key].shape == b[key].shape == (16, 1, 7, 7, 7)
    torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a[key], inflate_weight(state[key].sum(1, keepdim=True), 7))
    four_3d = _small_2d(spatial_dims=3, in_channels=4)
    for four in (adapt_input_channels(inflate_state_dict(state, four_3d), 4, key),
                 inflate_state_dict(adapt_input_channels(state, 4, key), four_3d)):
        torch.testing.assert_close(four[key], inflate_weight(state[key][:, [0, 1, 2, 0]] * 0.75, 7))
    grey_3d.load_state_dict(a, strict=True)
    grey_3d.load_state_dict(b, strict=True)


def test_rgb_2d_weights_load_into_a_grey_volume_model(tmp_path):
    """RGB DenseNet-121 weights (torchvision's layout) into create_model(spatial_dims=3,
    in_channels=1): inflated and conv0's channels summed; a grey volume constant along depth
    then gives (circular padding) the 2-D RGB model's logits on the slice replicated to RGB."""
    torch.manual_seed(0)
    rgb = _randomize(create_model("densenet121", implementation="reference"), seed=2).double()
    path = tmp_path / "rgb121.pth"
    torch.save(rgb.state_dict(), path)  # float64, so that the known answer below is exact
    grey = create_model("densenet121", spatial_dims=3, in_channels=1, weights=str(path)).eval()
    w = rgb.features.conv0.weight
    torch.testing.assert_close(grey.features.conv0.weight, inflate_weight(w.sum(1, keepdim=True), 7).float())
    torch.testing.assert_close(grey.features.denseblock3.denselayer5.conv2.weight,
                               inflate_weight(rgb.features.denseblock3.denselayer5.conv2.weight, 3).float())
    slice_ = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    volume = slice_.unsqueeze(2).expand(-1, -1, 32, -1, -1).contiguous()  # 32 deep: 1 at the end
    grey = create_model("densenet121", spatial_dims=3, in_channels=1, implementation="reference").double()
    load_weights_into(grey, path)
    rgb, grey = _circular(rgb.eval()), _circular(grey.eval())
    with torch.no_grad():
        want, got = rgb(slice_.expand(-1, 3, -1, -1)), grey(volume)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_rgb_2d_weights_fine_tune_a_two_class_volume_model(tmp_path):
    """A 1000-class torchvision-style file and a 2-class 3-D grey model: the classifier is
    replaced (load_pretrained, the --weights path), the backbone takes everything else,
    inflated; a backbone (features_only) ignores the head."""
    torch.manual_seed(0)
    rgb = create_model("densenet121", implementation="reference")
    state = rgb.state_dict()
    path = tmp_path / "tv121.pth"
    torch.save(state, path)
    model = create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)
    new_head, line = load_pretrained(model, path, ["benign", "malignant"])
    assert new_head and "new classifier for the data's 2 classes" in line
    own = model.state_dict()
    want = inflate_state_dict(adapt_input_channels(state, 1, "features.conv0.weight"), model)
    for k, v in own.items():
        if not k.startswith("classifier."):
            torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7, msg=k)
    backbone = create_model("densenet121", spatial_dims=3, in_channels=1, features_only=True,
                            weights=str(path))
    torch.testing.assert_close(backbone.features.conv0.weight, own["features.conv0.weight"])
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2)


def test_a_2d_monai_file_inflates_into_a_3d_model(tmp_path):
    theirs = _monai("densenet121", 2, 3)
    torch.save(theirs.state_dict(), tmp_path / "monai2d.pth")
    ours = create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2,
                        weights=str(tmp_path / "monai2d.pth"))
    torch.testing.assert_close(
        ours.features.denseblock1.denselayer2.conv2.weight,
        inflate_weight(theirs.features.denseblock1.denselayer2.layers.conv2.weight.float(), 3))
    torch.testing.assert_close(ours.classifier.bias, theirs.class_layers.out.bias.float())


def test_mismatches_that_are_not_inflation_or_channels_are_clear_errors(tmp_path):
    two_d = _small_2d()
    torch.save(two_d.state_dict(), tmp_path / "2d.pth")
    torch.save(_small_2d(spatial_dims=3).state_dict(), tmp_path / "3d.pth")
    torch.save(_small_2d(spatial_dims=1).state_dict(), tmp_path / "1d.pth")
    torch.save(_small_2d(growth_rate=12).state_dict(), tmp_path / "k12.pth")
    cases = [(_small_2d(), "3d.pth"),                        # 3-D weights, a 2-D model: no deflation
             (_small_2d(spatial_dims=3), "1d.pth"),          # 1-D weights, a 3-D model
             (_small_2d(spatial_dims=1), "2d.pth"),          # 2-D weights, a 1-D model
             (_small_2d(spatial_dims=3), "k12.pth")]         # another architecture, inflated or not
    for model, name in cases:
        with pytest.raises(UsageError, match=f"the weights in .*{name} do not fit this model"):
            load_weights_into(model, tmp_path / name)
    with pytest.raises(UsageError, match="do not fit this model"):
        load_strict(_small_2d(spatial_dims=3), two_d.state_dict(), "2d.pth", inflate=False)
    load_strict(_small_2d(spatial_dims=3), two_d.state_dict(), "2d.pth")  # inflated by default
    with pytest.raises(UsageError, match="do not fit this model"):
        load_pretrained(_small_2d(spatial_dims=3, num_classes=2), tmp_path / "1d.pth", ["a", "b"])


# ----------------------------------------------------------------------------- 1-D and 3-D models


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_forward_and_backbone_shapes(spatial_dims):
    side = SIDE[spatial_dims]
    torch.manual_seed(0)
    model = create_model("densenet121", spatial_dims=spatial_dims, in_channels=1, num_classes=2).eval()
    backbone = create_model("densenet121", spatial_dims=spatial_dims, in_channels=1,
                            features_only=True).eval()
    backbone.load_state_dict(model.state_dict(), strict=True)
    picked = create_model("densenet121", spatial_dims=spatial_dims, in_channels=1, features_only=True,
                          out_indices=(2, 3)).eval()
    cifar = create_model("densenet_bc40_k12", spatial_dims=spatial_dims, features_only=True).eval()
    small = 64 if spatial_dims == 1 else 8
    x = torch.randn(2, 1, *[side] * spatial_dims)
    info = model.feature_info
    assert info.reduction() == backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert info.channels() == [64, 256, 512, 1024, 1024]
    assert picked.feature_info.reduction() == [8, 16] and picked.feature_info.channels() == [512, 1024]
    assert cifar.feature_info.reduction() == [1, 2, 4]  # the CIFAR stem: no stride before block 1
    for implementation in ("efficient", "reference"):
        for m in (model, backbone, picked, cifar):
            m.set_implementation(implementation)
        with torch.no_grad():
            assert model(x).shape == (2, 2)
            final = model.forward_features(x)
            assert final.shape == (2, 1024, *[side // 32] * spatial_dims)
            maps = backbone(x)
            assert len(maps) == len(backbone.feature_info) == 5
            for m, d in zip(maps, backbone.feature_info):
                assert m.shape == (2, d["num_chs"], *[side // d["reduction"]] * spatial_dims), d
            torch.testing.assert_close(maps[-1], final)
            _, inter = model.forward_intermediates(x, indices=(1, -1))
            torch.testing.assert_close(inter[0], maps[1])
            assert [m.shape[1] for m in picked(x)] == [512, 1024]
            maps = cifar(torch.randn(2, 3, *[small] * spatial_dims))
            for m, d in zip(maps, cifar.feature_info):
                assert m.shape == (2, d["num_chs"], *[small // d["reduction"]] * spatial_dims)


def _flop_count_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    assert counter.get_total_flops() % 2 == 0
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("spatial_dims", [1, 3])
@pytest.mark.parametrize("name", ["densenet121", "densenet201"])
def test_count_macs_equals_flop_counter_on_monais_model(spatial_dims, name):
    side = 64 if spatial_dims == 1 else 32
    with torch.device("meta"):
        ours = create_model(name, spatial_dims=spatial_dims, in_channels=1, num_classes=2)
        theirs = MONAI[name](spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    x = torch.zeros(1, 1, *[side] * spatial_dims, device="meta")
    want = _flop_count_macs(theirs, x)
    assert count_macs(ours, side) == want
    assert ours.implementation == "efficient" and ours.training  # both restored
    if spatial_dims == 1 and name == "densenet121":  # on real tensors too
        real = create_model(name, spatial_dims=1, in_channels=1, num_classes=2)
        assert count_macs(real, side) == want
        assert _flop_count_macs(MONAI[name](spatial_dims=1, in_channels=1, out_channels=2),
                                torch.zeros(1, 1, side)) == want


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_table_1_summary_of_a_volume_model(spatial_dims):
    from densenet.analysis import _summarize
    with torch.device("meta"):
        model = create_model("densenet121", spatial_dims=spatial_dims, in_channels=1, num_classes=2)
    rows = _summarize(model.eval().set_implementation("reference"), 32, in_channels=1)
    assert sum(r["macs"] for r in rows) == count_macs(model, 32)
    assert sum(r["params"] for r in rows) == count_parameters(model)
    assert rows[0]["in_channels"] == 1
    assert [r["output_size"] for r in rows] == [[s] * spatial_dims for s in (16, 8, 8, 4, 4, 2, 2, 1, 1, 1)]

