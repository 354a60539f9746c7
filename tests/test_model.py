"""The model family of the paper (section 3 and Table 1 of the paper): exact sizes, shapes, torchvision parity."""

import re

import pytest
import torch
import torchvision

import densenet
from densenet import DenseNet, count_parameters, create_model, densenet_cifar, list_models

PARAMS_10_OR_1000 = {
    "densenet40_k12": 1_019_722,
    "densenet100_k12": 6_979_642,
    "densenet100_k24": 27_249_082,
    "densenet_bc100_k12": 769_162,
    "densenet_bc250_k24": 15_324_406,
    "densenet_bc190_k40": 25_624_430,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264": 33_337_704,
    "densenet161": 28_681_000,
}
PARAMS_100 = {
    "densenet40_k12": 1_060_132,
    "densenet100_k12": 7_084_852,
    "densenet100_k24": 27_457_972,
    "densenet_bc100_k12": 800_032,
    "densenet_bc250_k24": 15_480_556,
    "densenet_bc190_k40": 25_821_620,
}


def test_registry_holds_exactly_the_papers_models():
    # the DenseNets first; the ResNet baselines after them (tests/test_resnet.py)
    assert list_models()[:len(PARAMS_10_OR_1000)] == list(PARAMS_10_OR_1000)
    assert all(not n.startswith("densenet") for n in list_models()[len(PARAMS_10_OR_1000):])


@pytest.mark.parametrize("name,expected", PARAMS_10_OR_1000.items())
def test_parameter_count_matches_the_paper(name, expected):
    assert count_parameters(create_model(name)) == expected


@pytest.mark.parametrize("name,expected", PARAMS_100.items())
def test_parameter_count_with_100_classes(name, expected):
    assert count_parameters(create_model(name, num_classes=100)) == expected


@pytest.mark.parametrize("name", PARAMS_10_OR_1000)
def test_output_shape_at_native_input_size(name):
    info = densenet.model_info(name)
    model = create_model(name).eval()
    x = torch.randn(1, 3, info.input_size, info.input_size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    classes = info.kwargs["num_classes"]
    assert out.shape == (1, classes)
    final = 8 if info.input_size == 32 else 7  # 32/4 after two transitions, 224/32 for ImageNet
    assert feats.shape == (1, model.num_features, final, final)


def test_densenet_bc100_structure_follows_section_3():
    m = create_model("densenet_bc100_k12")
    assert m.features.conv0.out_channels == 24  # stem: 2k maps
    assert len(m.features.denseblock1) == 16  # (100 - 4) / 6
    assert m.features.transition1.conv.out_channels == (24 + 16 * 12) // 2
    layer = m.features.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (1, 1) and layer.conv1.out_channels == 48  # 4k
    assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 12
    assert all(c.bias is None for c in m.modules() if isinstance(c, torch.nn.Conv2d))


def test_basic_densenet_has_16_map_stem_and_no_bottleneck():
    m = create_model("densenet40_k12")
    assert m.features.conv0.out_channels == 16
    assert len(m.features.denseblock1) == 12  # (40 - 4) / 3
    assert not hasattr(m.features.denseblock1.denselayer1, "conv2")
    assert m.features.transition1.conv.out_channels == 16 + 12 * 12  # theta = 1


def test_generic_cifar_builder_matches_registered_model():
    a = densenet_cifar(100, growth_rate=12, bottleneck=True, compression=0.5)
    b = create_model("densenet_bc100_k12")
    assert count_parameters(a) == count_parameters(b)
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]


@pytest.mark.parametrize("depth,bottleneck", [(41, False), (102, True), (3, False), (9, True)])
def test_impossible_depth_is_rejected_with_valid_depths(depth, bottleneck):
    with pytest.raises(ValueError, match=r"valid depths are L = [36]n \+ 4"):
        densenet_cifar(depth, bottleneck=bottleneck)


@pytest.mark.parametrize("kwargs,word", [
    (dict(growth_rate=0), "growth_rate"),
    (dict(growth_rate=-12), "growth_rate"),
    (dict(compression=0.0), "compression"),
    (dict(compression=1.5), "compression"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(stem="huge"), "stem"),
])
def test_bad_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        DenseNet(**kwargs)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        create_model("densenet122")
    assert "densenet122" in str(e.value)
    for name in list_models():
        assert name in str(e.value)


def test_initialisation_follows_the_paper():
    m = create_model("densenet_bc100_k12")
    bn = m.features.denseblock2.denselayer3.norm2
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(m.classifier.bias == 0)
    conv = m.features.denseblock3.denselayer16.conv2  # 3x3, 12 outputs: std sqrt(2 / (9 * 12))
    expected_std = (2 / (9 * 12)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.1


def test_dropout_after_every_convolution_but_the_first():
    torch.manual_seed(0)
    m = densenet_cifar(40, growth_rate=12, bottleneck=False, compression=1.0, drop_rate=0.2)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    a, b = m(x), m(x)
    assert not torch.allclose(a, b)  # dropout active in training
    m.eval()
    assert torch.equal(m(x), m(x))
    assert hasattr(m.features.transition1, "drop")
    # the stem convolution has no dropout after it: block input equals conv0(x) exactly
    m.train()
    captured = {}
    m.features.denseblock1.register_forward_pre_hook(lambda mod, inp: captured.setdefault("x", inp[0]))
    m(x)
    assert torch.equal(captured["x"], m.features.conv0(x))


def test_reset_classifier_for_fine_tuning():
    m = create_model("densenet121")
    m.reset_classifier(37)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 37)
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)


def test_in_channels_and_channels_last_and_bf16_autocast():
    m = create_model("densenet_bc100_k12", in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = m(x)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


TV_BUILDERS = {
    "densenet121": torchvision.models.densenet121,
    "densenet161": torchvision.models.densenet161,
    "densenet169": torchvision.models.densenet169,
    "densenet201": torchvision.models.densenet201,
}


@pytest.mark.parametrize("name", TV_BUILDERS)
def test_same_logits_as_torchvision_given_its_weights(name):
    torch.manual_seed(0)
    tv = TV_BUILDERS[name]().eval()
    # random BN statistics so that the comparison exercises every BN
    for mod in tv.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    ours = create_model(name).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - tv(x)).abs().max().item()
    assert diff < 1e-5


def test_torchvision_loads_our_weights_strictly():
    ours = create_model("densenet121")
    tv = torchvision.models.densenet121()
    tv.load_state_dict(ours.state_dict(), strict=True)


def _legacy(state_dict):
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(.*)$")
    return {pattern.sub(r"\1.\2.\3", k): v for k, v in state_dict.items()}


def test_legacy_norm_dot_1_keys_load_strictly():
    tv = torchvision.models.densenet121().eval()
    legacy = _legacy(tv.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    ours = create_model("densenet121").eval()
    ours.load_state_dict(legacy, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() < 1e-5


def test_mismatched_state_dict_still_fails_strictly():
    ours = create_model("densenet121")
    sd = torchvision.models.densenet169().state_dict()
    with pytest.raises(RuntimeError):
        ours.load_state_dict(sd, strict=True)


def test_any_valid_cifar_shape_can_be_named():
    m = create_model("densenet_bc40_k12")
    assert len(m.features.denseblock1) == 6 and m.growth_rate == 12
    assert count_parameters(create_model("densenet_bc100_k12")) == 769_162
    with pytest.raises(ValueError, match="valid depths"):
        create_model("densenet_bc41_k12")


def test_weights_for_rgb_load_into_a_one_channel_model_by_summing_the_first_convolution(tmp_path):
    """A grey image through the 1-channel model = the same image replicated to RGB through the
    3-channel model (conv0's input channels summed); other counts repeat and scale them."""
    from densenet import create_model
    torch.manual_seed(0)
    rgb = create_model("densenet121", num_classes=5, block_config=(2, 2, 2, 2))
    rgb.train()(torch.randn(4, 3, 64, 64))  # BN statistics of real scale
    rgb.eval()
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    grey = create_model("densenet121", num_classes=5, block_config=(2, 2, 2, 2), in_channels=1,
                        weights=str(tmp_path / "rgb.pth")).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        want, got = rgb(x.expand(-1, 3, -1, -1)), grey(x)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    w = rgb.state_dict()["features.conv0.weight"]
    torch.testing.assert_close(grey.state_dict()["features.conv0.weight"], w.sum(1, keepdim=True))
    four = create_model("densenet121", num_classes=5, block_config=(2, 2, 2, 2), in_channels=4,
                        weights=str(tmp_path / "rgb.pth"))
    torch.testing.assert_close(four.state_dict()["features.conv0.weight"], w[:, [0, 1, 2, 0]] * 0.75)
