"""The paper's baselines: the ResNets of Table 2 and Figure 3, their exact sizes, torchvision's
weights, the paper's rows and figures."""

import json

import pytest
import torch
import torchvision
from PIL import Image

from densenet import ResNet, UsageError, count_parameters, create_model, model_info, preact_resnet, \
    resnet_cifar, wide_resnet
from densenet.analysis import summary, tradeoff_figure
from densenet.cli import main
from densenet.paper import TABLE2_BASELINES, paper_error, paper_points


# ----------------------------------------------------------------------------- exact sizes,
# counted here from the papers' descriptions, independently of the modules

def bn(c):
    return 2 * c  # weight and bias


def cifar_resnet_params(depth, classes):
    """He et al. 2016a: 3x3 conv (16), 3 stages of n basic blocks (16, 32, 64), option A."""
    n = (depth - 2) // 6
    total, c_in = 3 * 16 * 9 + bn(16), 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += c_in * w * 9 + w * w * 9 + 2 * bn(w)
            c_in = w
    return total + 64 * classes + classes


def preact_params(depth, classes, with_bn=True):
    """He et al. 2016b: bottleneck units (w, w, 4w) for w = 16, 32, 64, a projection where the
    shape changes, a final BN."""
    n = (depth - 2) // 9
    b = bn if with_bn else (lambda c: 0)
    total, c_in = 3 * 16 * 9, 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += b(c_in) + c_in * w + b(w) + 9 * w * w + b(w) + 4 * w * w
            if c_in != 4 * w or (_ == 0 and w != 16):
                total += c_in * 4 * w
            c_in = 4 * w
    return total + b(256) + 256 * classes + classes


def wrn_params(depth, k, classes):
    """Zagoruyko & Komodakis: pre-activation basic blocks of 16k, 32k, 64k maps."""
    n = (depth - 4) // 6
    total, c_in = 3 * 16 * 9, 16
    for w in (16 * k, 32 * k, 64 * k):
        for j in range(n):
            total += bn(c_in) + 9 * c_in * w + bn(w) + 9 * w * w
            if c_in != w or (j == 0 and w != 16 * k):
                total += c_in * w
            c_in = w
    return total + bn(64 * k) + 64 * k * classes + classes


CIFAR_BASELINES = {
    "resnet110": lambda c: cifar_resnet_params(110, c),
    "preact_resnet164": lambda c: preact_params(164, c),
    "preact_resnet1001": lambda c: preact_params(1001, c),
    "wrn16_4": lambda c: wrn_params(16, 4, c),
    "wrn16_8": lambda c: wrn_params(16, 8, c),
    "wrn28_10": lambda c: wrn_params(28, 10, c),
}
EXACT = {  # the same numbers written out, as the README's table gives them
    ("resnet110", 10): 1_727_962, ("resnet110", 100): 1_733_812,
    ("preact_resnet164", 10): 1_703_258, ("preact_resnet164", 100): 1_726_388,
    ("preact_resnet1001", 10): 10_327_706, ("preact_resnet1001", 100): 10_350_836,
    ("wrn16_4", 10): 2_748_890, ("wrn16_4", 100): 2_772_020,
    ("wrn16_8", 10): 10_961_370, ("wrn16_8", 100): 11_007_540,
    ("wrn28_10", 10): 36_479_194, ("wrn28_10", 100): 36_536_884,
}


def meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


@pytest.mark.parametrize("name,classes", list(EXACT))
def test_cifar_baselines_have_their_papers_exact_parameter_counts(name, classes):
    assert count_parameters(meta(name, num_classes=classes)) == CIFAR_BASELINES[name](classes) == EXACT[name, classes]


@pytest.mark.parametrize("name", list(CIFAR_BASELINES))
def test_cifar_baseline_counts_round_to_table_2(name):
    n = count_parameters(meta(name, num_classes=10))
    paper = TABLE2_BASELINES[name]["params"]
    if name == "preact_resnet1001":
        # 10.33M with BN's 149,216 scales and shifts; He et al.'s 10.2M counts the weights of
        # the convolutions and the classifier
        assert f"{n / 1e6:.2f}M" == "10.33M"
        without_bn = sum(p.numel() for m in meta(name, num_classes=10).modules()
                         if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for p in m.parameters())
        assert without_bn == preact_params(1001, 10, with_bn=False) == 10_178_490
        assert f"{without_bn / 1e6:.1f}M" == paper == "10.2M"
    else:
        assert f"{n / 1e6:.1f}M" == paper


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
@pytest.mark.parametrize("classes", [10, 100, 1000])
def test_imagenet_resnets_have_torchvisions_parameter_counts(depth, classes):
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=classes)
    assert count_parameters(meta(f"resnet{depth}", num_classes=classes)) == count_parameters(tv)
    assert model_info(f"resnet{depth}").input_size == 224


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dicts_load_strictly_and_give_torchvisions_outputs(depth, tmp_path):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so that eval mode is really tested
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    tv.eval()
    ours = create_model(f"resnet{depth}").eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    loaded = create_model(f"resnet{depth}", weights=str(tmp_path / "tv.pth")).eval()
    backbone = create_model(f"resnet{depth}", features_only=True).eval()
    backbone.load_state_dict(tv.state_dict(), strict=True)  # the head ignored
    with torch.no_grad():
        assert torch.equal(loaded(x), tv(x))
        assert torch.equal(backbone(x)[-1], tv.layer4(tv.layer3(tv.layer2(tv.layer1(
            tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))))


def test_a_wrong_state_dict_is_refused_with_the_file_named(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UsageError, match="r18.pth do not fit"):
        create_model("resnet34", weights=str(tmp_path / "r18.pth"))


@pytest.mark.parametrize("name,shape", [
    ("resnet110", (2, 10)), ("preact_resnet164", (2, 10)), ("wrn16_4", (2, 10)),
    ("resnet20", (2, 10)), ("preact_resnet20", (2, 10)), ("wrn10_2", (2, 10)),
])
def test_cifar_baselines_map_32px_images_to_logits(name, shape):
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == shape


def test_stages_halve_the_resolution_and_widen():
    model = create_model("preact_resnet20")
    final, maps = model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert model.feature_info.reduction() == [1, 2, 4]
    assert (final >= 0).all()  # after the last BN-ReLU
    backbone = create_model("resnet18", features_only=True)
    assert [t.shape[1:] for t in backbone(torch.randn(1, 3, 64, 64))] == [
        (64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_option_a_shortcut_has_no_parameters_and_pads_with_zero_maps():
    model = resnet_cifar(20)
    assert not any("downsample" in k for k in model.state_dict())
    block = model.features.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    from densenet.resnet import _identity
    skip = _identity(block, x)
    assert skip.shape == (1, 32, 4, 4)
    assert torch.equal(skip[:, :16], x[:, :, ::2, ::2]) and not skip[:, 16:].any()


def test_builders_accept_any_valid_depth_and_name_the_rule_otherwise():
    assert preact_resnet(47).depth == 47 and len(preact_resnet(47).features.layer1) == 5
    assert wide_resnet(22, 2).widths == (32, 64, 128)
    assert model_info("wrn40_4").kwargs["layers"] == (6, 6, 6)
    for name, rule in (("resnet111", "6n \\+ 2"), ("preact_resnet165", "9n \\+ 2"), ("wrn17_8", "6n \\+ 4")):
        with pytest.raises(UsageError, match=rule):
            create_model(name)
    with pytest.raises(UsageError, match="preact_resnet\\{L\\}"):
        create_model("resnet_unknown")


def test_dropout_sits_in_every_residual_branch():
    model = create_model("wrn16_4", drop_rate=0.3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)
    assert not any(isinstance(m, torch.nn.Dropout) for m in create_model("wrn16_4").modules())


def test_volumes_get_3d_residual_networks():
    model = create_model("resnet18", spatial_dims=3, in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2)


def test_summary_and_models_list_the_baselines_with_flops(capsys):
    s = summary("resnet50")
    assert s["totals"]["params"] == 25_557_032 and round(s["totals"]["macs"] / 1e9, 2) == 4.09  # torchvision: 4.09 GFLOPS
    assert s["depth"] == 50 and s["growth_rate"] is None
    assert [r["stage"] for r in s["stages"]][-2:] == ["Residual Stage (4)", "Classification Layer"]
    assert summary("preact_resnet164")["totals"]["depth"] == 164  # projections not counted
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet110", "preact_resnet164", "preact_resnet1001", "wrn16_8", "wrn28_10", "resnet152"):
        assert f"\n{name} " in out
    assert "1,727,962" in out and "36,479,194" in out


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20", "wrn10_2", "resnet18"])
def test_summary_macs_equal_pytorchs_flop_counter(name):
    from densenet.model import count_macs
    model = create_model(name)
    size = model_info(name).input_size
    assert summary(name)["totals"]["macs"] == count_macs(model, size)


# ----------------------------------------------------------------------------- the paper's rows

def test_table2_rows_of_the_baselines_are_data():
    assert paper_error("resnet110", "c10+") == pytest.approx(0.0641)
    assert paper_error("preact_resnet1001", "c100+") == pytest.approx(0.2271)
    assert paper_error("preact_resnet164", "c10") == pytest.approx(0.1126)
    assert paper_error("wrn28_10", "c10+") == pytest.approx(0.0417)
    assert paper_error("wrn16_4", "svhn") == pytest.approx(0.0164)
    assert paper_error("wrn16_8", "svhn") is None
    assert paper_error("resnet50", "imagenet") == pytest.approx(0.2401)


def test_figure3_has_both_families_with_their_sources():
    points = paper_points("ImageNet")
    assert [p["label"] for p in points if p["family"] == "ResNet"] == [
        "ResNet-34", "ResNet-50", "ResNet-101", "ResNet-152"]
    assert {p["family"] for p in points} == {"DenseNet-BC", "ResNet"}
    assert all(p["source"] for p in points)


def test_plot_params_draws_both_families_and_writes_the_figure_data(tmp_path, capsys):
    out, js = tmp_path / "fig4.png", tmp_path / "fig4.json"
    assert main(["plot", "--kind", "params", "--paper", "C10+", "--out", str(out), "--json", str(js)]) == 0
    with Image.open(out) as img:
        assert img.size == (750, 500)
    data = json.loads(js.read_text())
    assert data["figure"] == "Figure 4 (middle)" and data["kind"] == "params"
    by_family = {s["family"]: s for s in data["series"]}
    assert {"DenseNet-BC", "pre-activation ResNet"} <= set(by_family)
    bc = {p["model"]: p for p in by_family["DenseNet-BC"]["points"]}
    assert bc["densenet_bc100_k12"]["x"] == 769_162 and bc["densenet_bc100_k12"]["error"] == 4.51
    pre = {p["model"]: p for p in by_family["pre-activation ResNet"]["points"]}
    assert pre["preact_resnet1001"]["x"] == 10_327_706 and pre["preact_resnet1001"]["error"] == 4.62


def test_plot_flops_is_figure_3_with_multiply_adds():
    data = tradeoff_figure(kind="flops")
    assert data["figure"] == "Figure 3"
    resnets = {p["model"]: p["x"] for s in data["series"] if s["family"] == "ResNet" for p in s["points"]}
    assert round(resnets["resnet50"] / 1e9, 2) == 4.09 and round(resnets["resnet152"] / 1e9, 2) == 11.51


def test_plot_refuses_an_unknown_column(tmp_path, capsys):
    assert main(["plot", "--kind", "params", "--paper", "C11", "--out", str(tmp_path / "x.png")]) == 2
    assert "--paper 'C11' is not a result column" in capsys.readouterr().err


def test_resnet_class_is_exported_and_checks_its_arguments():
    assert isinstance(create_model("resnet110"), ResNet)
    with pytest.raises(UsageError, match="block must be one of"):
        ResNet(block="dense")
    with pytest.raises(UsageError, match="shortcut must be"):
        ResNet(shortcut="maybe")
