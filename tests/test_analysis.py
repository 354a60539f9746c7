"""The paper's analyses: Table 1 summaries, Figure 5 feature reuse, curves and Table 2 reports."""

import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

from densenet import DenseNet, create_model, list_models
from densenet.analysis import feature_reuse, report, summary
from densenet.rundir import save_checkpoint
from densenet.cli import main
from densenet.model import count_macs, count_parameters
from densenet.plots import plot_curves

TINY = "densenet_bc16_k4"


def meta_model(name, **overrides):
    """The model with shapes only (no memory): fast enough to count FLOPs of DenseNet-264.
    The plain-concatenation implementation, whose forward the meta device can trace."""
    with torch.device("meta"):
        return create_model(name, implementation="reference", **overrides)


# ----------------------------------------------------------------------------- Table 1

@pytest.mark.parametrize("name", list_models())
def test_summary_totals_are_the_models_parameters_and_flop_counter_macs(name):
    s = summary(name)
    model = meta_model(name)
    assert s["totals"]["params"] == count_parameters(model)
    # FlopCounterMode on a forward pass (2 FLOPs per multiply-add; count_macs halves it).
    assert s["totals"]["macs"] == count_macs(model, s["input_size"])


@pytest.mark.parametrize("name,size,classes", [("densenet_bc28_k12", 64, 100),
                                               ("densenet22_k8", 40, 7),
                                               ("densenet121", 160, 10)])
def test_summary_follows_any_shape_input_size_and_classes(name, size, classes):
    s = summary(name, input_size=size, num_classes=classes)
    model = meta_model(name, num_classes=classes)
    assert s["num_classes"] == classes
    assert s["totals"]["params"] == count_parameters(model)
    assert s["totals"]["macs"] == count_macs(model, size)


def test_summary_macs_match_a_real_forward_pass_on_the_cpu():
    model = create_model("densenet40_k12")
    assert summary("densenet40_k12")["totals"]["macs"] == count_macs(model, 32)


def test_densenet121_summary_is_table_1():
    s = summary("densenet121")
    assert s["totals"]["params"] == 7_978_856
    assert round(s["totals"]["macs"] / 1e9, 2) == 2.83  # torchvision: 2.834 GFLOPS (MACs)
    assert s["totals"]["depth"] == 121
    assert [r["output_size"][0] for r in s["stages"]] == [112, 56, 56, 28, 28, 14, 14, 7, 7, 1]
    assert [r["layers"] for r in s["stages"] if r["kind"] == "block"] == [6, 12, 24, 16]
    assert s["stages"][2]["composition"] == "[1x1 conv, 3x3 conv] x 6"


def test_cifar_summary_depth_is_the_papers_L():
    assert summary("densenet40_k12")["totals"]["depth"] == 40
    assert summary("densenet_bc100_k12")["totals"]["depth"] == 100


def test_models_command_lists_every_model_with_params_and_flops(capsys):
    assert main(["models", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in table] == list_models()
    row = table[list_models().index("densenet121")]
    assert (row["params"], row["input_size"]) == (7_978_856, 224)
    assert row["macs"] == 2_834_161_664


def test_summary_command_prints_table_and_json(capsys):
    assert main(["summary", "densenet_bc100_k12", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert "800,032" in out and "Dense Block (3)" in out
    assert main(["summary", "densenet121", "--input-size", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["output_size"] == [128, 128]


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_summary_builds_the_model_in_any_dimension(spatial_dims):
    side = 64 if spatial_dims == 1 else 32
    s = summary("densenet121", input_size=side, num_classes=2, spatial_dims=spatial_dims,
                in_channels=1)
    model = meta_model("densenet121", spatial_dims=spatial_dims, in_channels=1, num_classes=2)
    assert s["totals"]["params"] == count_parameters(model)
    assert s["totals"]["macs"] == count_macs(model, side)
    assert s["totals"]["depth"] == 121
    assert s["stages"][0]["in_channels"] == 1
    assert [r["output_size"] for r in s["stages"]] == [
        [side // f] * spatial_dims for f in (2, 4, 4, 8, 8, 16, 16, 32, 32, side)]
    ones, threes = "x".join(["1"] * spatial_dims), "x".join(["3"] * spatial_dims)
    assert s["stages"][2]["composition"] == f"[{ones} conv, {threes} conv] x 6"


def test_summary_command_of_a_volume_model(capsys):
    argv = ["summary", "densenet121", "--spatial-dims", "3", "--in-channels", "1", "--input-size", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    model = meta_model("densenet121", spatial_dims=3, in_channels=1)
    params, macs = count_parameters(model), count_macs(model, 64)
    assert "64x64x64 input" in out
    lines = out.splitlines()
    conv = next(line for line in lines if line.startswith("Convolution"))
    assert conv.split()[1:3] == ["32x32x32", "1"]  # output size, input channels
    assert "7x7x7 conv, stride 2" in conv
    assert any(line.startswith("Dense Block (1)") and " 16x16x16 " in line for line in lines)
    assert "[1x1x1 conv, 3x3x3 conv] x 6" in out and "1x1x1 global average pool" not in out
    total = lines[-1]
    assert total.startswith("total") and f"{params:,}" in total and f"({macs:,} multiply-adds)" in total
    assert main(argv + ["--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["stages"][1]["output_size"] == [16, 16, 16]
    assert (s["totals"]["params"], s["totals"]["macs"]) == (params, macs)
    # 1-D: sizes are one number
    assert main(["summary", "densenet121", "--spatial-dims", "1", "--in-channels", "2",
                 "--input-size", "96", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["stages"][0]["output_size"] == [48] and s["stages"][0]["in_channels"] == 2
    assert s["totals"]["macs"] == count_macs(meta_model("densenet121", spatial_dims=1, in_channels=2), 96)


@pytest.mark.parametrize("argv", [["summary", "densenet_nope"], ["summary", "densenet121", "--input-size", "8"],
                                  ["summary", "densenet_bc17_k12"],
                                  ["summary", "densenet121", "--spatial-dims", "3", "--input-size", "16"]])
def test_summary_mistakes_are_usage_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("densenet: error:") and "Traceback" not in err


# ----------------------------------------------------------------------------- Figure 5

def hand_set_model() -> DenseNet:
    """Basic net: stem 3 maps, k=2, blocks of 2 and 1 layers, theta=1, 4 classes; every weight
    set by hand so that each (source, target) mean |w| is known."""
    model = DenseNet(growth_rate=2, block_config=(2, 1), bottleneck=False, compression=1.0,
                     num_init_features=3, stem="cifar", num_classes=4)
    b1, b2 = model.features.denseblock1, model.features.denseblock2
    with torch.no_grad():
        # block 1, layer 1 reads source 0 (3 maps): all 0.5
        b1.denselayer1.conv1.weight.fill_(0.5)
        # layer 2 reads source 0 (maps 0-2): -0.2; source 1 (maps 3-4): one weight of 3.6 among
        # 2 filters x 2 maps x 3x3 = 36 weights -> mean 0.1
        w = b1.denselayer2.conv1.weight
        w.zero_()
        w[:, 0:3] = -0.2
        w[1, 4, 1, 1] = 3.6
        # transition (7 -> 7, 1x1) reads sources 0 (0-2): 0.3; 1 (3-4): -0.4;
        # 2 (5-6): 0.7 in 3 of the 7 filters -> 0.7 * 3 / 7
        w = model.features.transition1.conv.weight
        w.zero_()
        w[:, 0:3] = 0.3
        w[:, 3:5] = -0.4
        w[0:3, 5:7] = 0.7
        # block 2 (input 7 maps), layer 1: all 1.0
        b2.denselayer1.conv1.weight.fill_(1.0)
        # classifier (9 -> 4) reads source 0 (0-6): 0.25; source 1 (7-8): +-2 alternating
        w = model.classifier.weight
        w[:, 0:7] = 0.25
        w[:, 7:9] = torch.tensor([[2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, 2.0]])
    return model


def test_feature_reuse_matrix_equals_the_hand_computed_one():
    blocks = feature_reuse(hand_set_model())
    assert [b["targets"] for b in blocks] == [["layer 1", "layer 2", "transition 1"],
                                              ["layer 1", "classifier"]]
    expected1 = [[0.5, 0.2, 0.3],
                 [None, 0.1, 0.4],
                 [None, None, 0.3]]
    expected2 = [[1.0, 0.25],
                 [None, 2.0]]
    for got, want in ((blocks[0]["matrix"], expected1), (blocks[1]["matrix"], expected2)):
        assert len(got) == len(want)
        for g_row, w_row in zip(got, want):
            assert [g is None for g in g_row] == [v is None for v in w_row]
            assert [g for g in g_row if g is not None] == pytest.approx([v for v in w_row if v is not None])


def test_feature_reuse_of_a_bottleneck_net_reads_the_1x1_convolution():
    model = create_model(TINY)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(-1.0 if m.kernel_size == (1, 1) else 9.0)
    for block in feature_reuse(model):
        values = [v for row in block["matrix"] for v in row[:-1] if v is not None]
        assert values == pytest.approx([1.0] * len(values))


def write_checkpoint(run_dir, name=TINY, epoch=2):
    model = create_model(name)
    save_checkpoint(run_dir / "best.pt", {
        "model": {"name": name, "overrides": {}}, "state_dict": model.state_dict(),
        "classes": [str(i) for i in range(10)], "epoch": epoch,
        "preprocess": {"kind": "small", "input_size": 32, "resize": None,
                       "mean": [0.5] * 3, "std": [0.25] * 3}})
    return model


def test_analyze_writes_heat_map_png_and_json(tmp_path, capsys):
    run_dir = tmp_path / "run"
    model = write_checkpoint(run_dir)
    out, js = tmp_path / "reuse.png", tmp_path / "reuse.json"
    assert main(["analyze", str(run_dir), "--out", str(out), "--json", str(js)]) == 0
    with Image.open(out) as img:
        assert img.size == (1300, 400)  # (3 panels x 4 in + 1 in) x 4 in at 100 dpi
    data = json.loads(js.read_text())
    assert data["model"] == TINY and len(data["blocks"]) == 3
    assert data["blocks"] == json.loads(json.dumps(feature_reuse(model)))
    assert data["blocks"][2]["targets"][-1] == "classifier"


def test_analyze_of_a_missing_run_is_a_usage_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runs

def metrics_rows(epochs, val=True):
    return [{"epoch": e, "train_loss": 2.0 / e, "train_error": 0.6 / e,
             "val_loss": 2.2 / e if val else None, "val_error": 0.65 / e if val else None,
             "lr": 0.1, "images_per_s": 100.0, "seconds": 1.0} for e in range(1, epochs + 1)]


def make_run(root, name, model="densenet40_k12", recipe="c10+", result=None, metrics=None,
             num_classes=10):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model": model, "recipe": recipe,
                                               "num_classes": num_classes, "epochs": 3}))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if result is not None:
        (d / "result.json").write_text(json.dumps({"model": model, "recipe": recipe, **result}))
    return d


def test_curves_png_has_the_requested_size_with_null_validation(tmp_path):
    out = tmp_path / "curves.png"
    plot_curves([("a", metrics_rows(5, val=False)), ("b", metrics_rows(3))], out, figsize=(8, 3))
    with Image.open(out) as img:
        assert img.size == (800, 300)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_plot_command_overlays_runs_and_plots_error_against_params_and_flops(tmp_path, capsys):
    a = make_run(tmp_path, "a", metrics=metrics_rows(4),
                 result={"params": 1_019_722, "flops": 264_812_928, "final_val_error": 0.2,
                         "best_val_error": 0.19, "test_error": 0.21})
    b = make_run(tmp_path, "b", model="densenet_bc100_k12", metrics=metrics_rows(2))  # no result yet
    for kind, size in (("curves", (1000, 400)), ("params", (750, 500)), ("flops", (750, 500))):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", str(a), str(b), "--out", str(out), "--kind", kind]) == 0
        with Image.open(out) as img:
            assert img.size == size
        assert out.stat().st_size > 5000


def test_plot_of_a_run_without_metrics_is_a_usage_error(tmp_path, capsys):
    d = make_run(tmp_path, "empty")
    assert main(["plot", str(d), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_places_the_papers_error_beside_the_runs(tmp_path, capsys):
    d = make_run(tmp_path, "c10plus", metrics=metrics_rows(3),
                 result={"params": 1_019_722, "best_val_error": 0.06, "final_val_error": 0.061,
                         "test_error": 0.0551})
    row, = report([d])
    assert (row["model"], row["depth"], row["k"], row["params"]) == ("densenet40_k12", 40, 12, 1_019_722)
    assert row["paper_error"] == pytest.approx(0.0524)  # Table 2, DenseNet L=40 k=12, C10+
    assert row["difference"] == pytest.approx(0.0027)
    assert main(["report", str(d), "--markdown"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| c10plus"))
    assert "| 5.51 | 5.24 | +0.27 |" in line


def test_report_uses_table_3_for_imagenet_and_nothing_for_unknown_pairs(tmp_path):
    inet = make_run(tmp_path, "inet", model="densenet121", recipe="imagenet", num_classes=1000,
                    result={"test_error": 0.2550, "best_val_error": None})
    quick = make_run(tmp_path, "quick", model=TINY, recipe="quickstart", metrics=metrics_rows(2))
    r_inet, r_quick = report([inet, quick])
    assert r_inet["paper_error"] == pytest.approx(0.2502)
    assert (r_inet["depth"], r_inet["k"], r_inet["params"]) == (121, 32, 7_978_856)
    assert r_quick["paper_error"] is None and r_quick["difference"] is None
    assert r_quick["best_val_error"] == pytest.approx(0.65 / 2) and not r_quick["complete"]
