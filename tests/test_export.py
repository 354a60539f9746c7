"""Export: ONNX (onnxruntime), TorchScript and ExportedProgram files compute the model's logits."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from densenet import create_model
from densenet.rundir import save_checkpoint
from densenet.errors import UsageError
from densenet.export import TOLERANCE, export, load_exported
from densenet.inference import load_for_inference

IMAGENET = {"kind": "imagenet", "input_size": 224, "resize": 256,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SMALL = {"kind": "small", "input_size": 32, "resize": None, "mean": [0.49, 0.48, 0.45],
         "std": [0.25, 0.24, 0.26]}


def with_real_statistics(model, size, seed=0):
    """BatchNorm running statistics measured on inputs, as after training. A fresh net's default
    statistics (mean 0, var 1) let activations grow through the blocks to logits of ~1e4-1e8,
    where float32 rounding alone exceeds any absolute tolerance."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def make_checkpoint(path, name, preprocess, num_classes):
    model = with_real_statistics(create_model(name, num_classes=num_classes),
                                 preprocess["input_size"])
    save_checkpoint(path, {"model": {"name": name, "overrides": {"num_classes": num_classes}},
                           "state_dict": model.state_dict(),
                           "classes": [f"class{i}" for i in range(num_classes)],
                           "preprocess": preprocess})
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"densenet_bc100_k12": make_checkpoint(d / "bc100.pt", "densenet_bc100_k12", SMALL, 10),
            "densenet121": make_checkpoint(d / "d121.pt", "densenet121", IMAGENET, 1000)}


SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}


@pytest.mark.parametrize("fmt,tolerance", [("onnx", 1e-4), ("torchscript", 1e-5),
                                           ("exported-program", 1e-5)])
@pytest.mark.parametrize("name", ["densenet_bc100_k12", "densenet121"])
def test_the_exported_file_matches_pytorch(checkpoints, tmp_path, name, fmt, tolerance):
    loaded = load_for_inference(checkpoints[name])
    report = export(loaded, fmt, tmp_path / f"model{SUFFIX[fmt]}")
    assert report["ok"] and report["max_abs_diff"] <= tolerance
    # and independently of export()'s own check, at a batch size it never saw
    size = loaded.preprocess["input_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    run = load_exported(fmt, report["out"])
    reference = load_for_inference(checkpoints[name]).model
    with torch.no_grad():
        diff = (run(x) - reference(x)).abs().max().item()
        assert diff <= tolerance
        assert reference(x).abs().max().item() > 0.1  # real logits, not a degenerate all-zero net
    if fmt == "onnx":
        check_onnx_metadata(report["out"], name, loaded.preprocess)


def check_onnx_metadata(path, name, preprocess):
    """The file carries the model name, classes and preprocessing, and a dynamic batch axis."""
    import onnx
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["densenet.json"])
    assert meta["model"] == name
    assert meta["classes"][:2] == ["class0", "class1"]
    assert meta["preprocess"] == preprocess
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value


def test_export_exits_non_zero_when_the_difference_exceeds_the_tolerance(checkpoints, tmp_path,
                                                                         monkeypatch, capsys):
    import densenet.export as export_mod
    from densenet.cli import main
    monkeypatch.setattr(export_mod, "verify", lambda *a, **k: export_mod.Difference(0.5, 1.0))
    rc = main(["export", str(checkpoints["densenet_bc100_k12"]), "--format", "torchscript",
               "--out", str(tmp_path / "m.pt")])
    out = capsys.readouterr()
    assert rc == 1
    assert "0.5" in out.out and "FAILED" in out.out


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory):
    """A freshly initialised DenseNet-BC-100 as a plain state dict: BN statistics of mean 0 and
    variance 1 let its logits grow to ~1e5."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "bc100.pth"
    torch.save(create_model("densenet_bc100_k12").state_dict(), path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_an_untrained_model_passes_relative_to_its_logits_scale(untrained_weights, tmp_path, fmt):
    loaded = load_for_inference(weights=str(untrained_weights), model="densenet_bc100_k12")
    report = export(loaded, fmt, tmp_path / f"model{SUFFIX[fmt]}")
    assert report["logit_scale"] > 1e4  # where float32 rounding alone is ~1e-2 absolute
    assert report["max_rel_diff"] == report["max_abs_diff"] / report["logit_scale"]
    assert report["ok"] and report["max_rel_diff"] <= report["tolerance"] == TOLERANCE[fmt]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "bc10.pt", "densenet_bc10_k4", SMALL, 10)


@pytest.mark.parametrize("abs_diff,scale,tolerance,ok,relative", [
    (0.0547, 1.1e5, None, True, "4.97e-07"),   # the untrained model
    (0.05, 0.5, None, False, "0.05"),          # near-zero logits: divided by the floor of 1
    (5e-6, 0.01, None, True, "5e-06"),
    (0.5, 1000.0, "0.001", True, "0.0005"),    # --tolerance is relative too
    (0.5, 100.0, "0.001", False, "0.005"),
])
def test_the_tolerance_is_relative_to_the_logits_scale(tiny_checkpoint, tmp_path, monkeypatch,
                                                       capsys, abs_diff, scale, tolerance, ok,
                                                       relative):
    import densenet.export as export_mod
    from densenet.cli import main
    monkeypatch.setattr(export_mod, "verify", lambda *a, **k: export_mod.Difference(abs_diff, scale))
    extra = ["--tolerance", tolerance] if tolerance else []
    rc = main(["export", str(tiny_checkpoint), "--format", "torchscript", "--out",
               str(tmp_path / "m.pt"), *extra])
    out = capsys.readouterr()
    assert rc == (0 if ok else 1)
    assert f"max abs logit difference {abs_diff:.3g} on logits up to {scale:.3g}" in out.out
    assert f"relative {relative} (tolerance {tolerance or '1e-05'})" in out.out
    assert ("OK" in out.out) == ok and ("FAILED" in out.out) != ok
    assert ("do not ship" in out.err) != ok


def test_missing_onnxruntime_is_a_clear_error(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(UsageError, match=r"onnxruntime.*pip install 'densenet-torch\[export\]'"):
        export(load_for_inference(checkpoints["densenet_bc100_k12"]), "onnx", tmp_path / "m.onnx")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "densenet", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_export_command_reports_the_max_difference(checkpoints, tmp_path):
    r = run_cli("export", checkpoints["densenet_bc100_k12"], "--format", "torchscript",
                "--out", tmp_path / "m.pt")
    assert r.returncode == 0, r.stderr
    assert "max abs logit difference 0" in r.stdout and "OK" in r.stdout
    assert (tmp_path / "m.pt").is_file()


@pytest.mark.parametrize("kind,as_weights", [("pickled list", False), ("text file", False),
                                             ("saved list", True)])
def test_a_checkpoint_of_unknown_format_is_a_clear_error(tmp_path, kind, as_weights):
    bad = tmp_path / "weights.pt"
    if kind == "pickled list":
        bad.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "text file":
        bad.write_text("these are not weights\n")
    else:
        torch.save([torch.zeros(3)], bad)
    source = ["--weights", bad, "--model", "densenet121"] if as_weights else [bad]
    r = run_cli("export", *source, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert str(bad) in r.stderr
    assert not (tmp_path / "m.onnx").exists()
