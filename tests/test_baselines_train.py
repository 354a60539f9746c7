"""A ResNet baseline trains, resumes, evaluates, exports and is reported like a DenseNet."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from densenet import count_parameters, create_model
from densenet.analysis import format_report, report, tradeoff_figure
from densenet.rundir import load_checkpoint
from densenet.train import train
from test_train import make_folder_data

TINY_PREACT = "preact_resnet11"  # one bottleneck unit per stage
TINY_WRN = "wrn10_1"             # one pre-activation basic block per stage


def cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "densenet", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_data(tmp_path_factory.mktemp("baselines") / "data", per_class=16)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run") / "preact"
    train(TINY_PREACT, "c10+", str(data), str(out), epochs=3, batch_size=8, quiet=True, seed=1,
          set_fields={"val_size": "6"})
    return out


def test_a_preactivation_resnet_trains_into_a_run_directory(baseline_run):
    result = json.loads((baseline_run / "result.json").read_text())
    assert result["params"] == count_parameters(create_model(TINY_PREACT, num_classes=3))
    assert result["best_val_error"] is not None
    assert len((baseline_run / "metrics.jsonl").read_text().splitlines()) == 3
    ckpt = load_checkpoint(baseline_run / "best.pt")
    assert ckpt["model"]["name"] == TINY_PREACT
    assert "features.layer1.0.conv1.weight" in ckpt["state_dict"]


def test_a_wide_resnet_with_dropout_resumes_to_the_same_weights(tmp_path, data):
    kw = dict(epochs=2, batch_size=8, quiet=True, seed=3, set_fields={"val_size": "6", "drop_rate": "0.3"})
    train(TINY_WRN, "c10+", str(data), str(tmp_path / "full"), **kw)
    train(TINY_WRN, "c10+", str(data), str(tmp_path / "cut"), max_steps=4, **kw)
    train(resume=str(tmp_path / "cut"), quiet=True)
    full = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert any(isinstance(m, torch.nn.Dropout) for m in create_model(TINY_WRN, drop_rate=0.3).modules())
    for k, v in full.items():
        assert torch.equal(v, resumed[k]), k


def test_eval_predict_and_export_take_a_baseline_run(baseline_run, data, tmp_path):
    r = cli("eval", baseline_run, "--data", data, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 48
    r = cli("predict", baseline_run, data / "cat" / "000.png")
    assert r.returncode == 0, r.stderr
    for fmt, name in (("onnx", "m.onnx"), ("exported-program", "m.pt2")):
        r = cli("export", baseline_run, "--format", fmt, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert "OK" in r.stdout and (tmp_path / name).is_file()


def test_compiled_training_of_a_baseline_compiles_once(tmp_path, data):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    train(TINY_PREACT, "c10+", str(data), str(tmp_path / "run"), epochs=1, batch_size=8,
          set_fields={"val_size": "0"}, quiet=True, device="cpu", compile=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def _ddp_gradients(rank, port, name, out):
    import torch.distributed as dist
    from densenet.distributed import convert_sync_batchnorm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = convert_sync_batchnorm(create_model(name, num_classes=3).double())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = _batch()
    torch.nn.functional.cross_entropy(ddp(x[4 * rank:4 * rank + 4]), y[4 * rank:4 * rank + 4]).backward()
    if rank == 0:
        out.update({k: p.grad.clone() for k, p in model.named_parameters()})
    dist.destroy_process_group()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("name", ["resnet8", TINY_PREACT, TINY_WRN])
def test_two_processes_with_sync_bn_give_the_gradient_of_the_global_batch(name):
    # float64: any difference is a mistake, not rounding (in float32 a batch of 4 per process
    # can amplify rounding in a nearly constant BN channel to 1e-4 within one step)
    import socket
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).double()
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_gradients, args=(port, name, out), nprocs=2)
    for k, p in model.named_parameters():
        torch.testing.assert_close(out[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)


def test_a_baseline_trains_on_two_processes_from_the_command_line(tmp_path, data):
    args = ["train", "--model", TINY_WRN, "--recipe", "c10", "--batch-size", "8", "--lr", "0.01",
            "--quiet", "--set", "val_size=0", "--set", "drop_rate=0", "--device", "cpu",
            "--data", data, "--epochs", "1"]
    one = cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = cli(*args, "--out", tmp_path / "two", "--nproc", "2", "--sync-bn")
    assert two.returncode == 0, two.stderr
    assert "2 processes" in two.stdout
    a = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "two" / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:  # the same training up to float32 rounding (exactness: the float64 test above)
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-2, msg=k)


# ----------------------------------------------------------------------------- report and plot

def fake_run(root, name, model, recipe="c10+", error=0.06):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model": model, "recipe": recipe, "num_classes": 10}))
    (d / "result.json").write_text(json.dumps({"model": model, "recipe": recipe, "test_error": error,
                                               "final_val_error": error, "best_val_error": error}))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_error": error}) + "\n")
    return d


def test_report_puts_a_baseline_run_beside_its_table2_row(tmp_path):
    runs = [fake_run(tmp_path, "pre164", "preact_resnet164", error=0.0560),
            fake_run(tmp_path, "r110", "resnet110", recipe="c100+", error=0.28)]
    rows = report(runs)
    assert rows[0]["paper_error"] == pytest.approx(0.0546) and rows[0]["depth"] == 164
    assert rows[0]["params"] == 1_703_258 and rows[0]["k"] is None
    assert rows[0]["difference"] == pytest.approx(0.0014)
    assert rows[1]["paper_error"] == pytest.approx(0.2722) and rows[1]["depth"] == 110
    table = format_report(rows)
    assert "preact_resnet164" in table and "5.46" in table and "27.22" in table


def test_plot_of_runs_alone_compares_densenet_bc_with_preactivation_resnet(tmp_path, capsys):
    from densenet.cli import main
    runs = [fake_run(tmp_path, "bc40", "densenet_bc40_k12", error=0.07),
            fake_run(tmp_path, "bc52", "densenet_bc52_k12", error=0.06),
            fake_run(tmp_path, "pre20", "preact_resnet20", error=0.08)]
    out, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    assert main(["plot", *map(str, runs), "--kind", "params", "--paper", "none", "--out", str(out),
                 "--json", str(js)]) == 0
    assert out.stat().st_size > 5000
    data = json.loads(js.read_text())
    assert data["column"] is None
    series = {s["name"]: [(p["label"], p["x"], round(p["error"], 6)) for p in s["points"]]
              for s in data["series"]}
    assert series == {"DenseNet-BC (runs)": [("bc40", 176_122, 7.0), ("bc52", 264_586, 6.0)],
                      "pre-activation ResNet (runs)": [("pre20", 219_482, 8.0)]}
    # with the paper's points (the runs' recipe picks Figure 4's C10+) the runs sit over them
    full = tradeoff_figure(runs, "params")
    assert full["figure"] == "Figure 4 (middle)"
    assert {s["name"] for s in full["series"]} >= {"DenseNet-BC (paper)", "pre-activation ResNet (paper)",
                                                   "DenseNet-BC (runs)", "pre-activation ResNet (runs)"}


def test_runs_of_different_columns_need_a_chosen_paper_column(tmp_path, capsys):
    from densenet.cli import main
    runs = [fake_run(tmp_path, "a", "resnet110"), fake_run(tmp_path, "b", "resnet110", recipe="c100+")]
    assert main(["plot", *map(str, runs), "--kind", "params", "--out", str(tmp_path / "x.png")]) == 2
    assert "different result columns (C10+, C100+)" in capsys.readouterr().err


def test_grad_cam_explains_the_last_residual_stage_of_a_baseline(baseline_run, data, tmp_path):
    r = cli("cam", baseline_run, data / "cat" / "000.png", "--out", tmp_path / "cam.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cam.png").stat().st_size > 1000


def test_fine_tuning_starts_from_a_torchvision_resnet_file_with_a_new_head(tmp_path, data):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "ft"
    train("resnet18", "finetune", str(data), str(out), weights=str(tmp_path / "r18.pth"), epochs=1,
          batch_size=8, max_steps=2, quiet=True, freeze="features", set_fields={"input_size": "64"})
    log = (out / "train.log").read_text()
    assert "new classifier for the data's 3 classes (the file has 1000 classes, the data 3)" in log
    state = load_checkpoint(out / "last.pt")["state_dict"]
    assert state["classifier.weight"].shape == (3, 512)
    # frozen features (weights and BN statistics) are torchvision's tensors, under our names
    for ours, theirs in (("features.conv1.weight", tv.conv1.weight), ("features.bn1.running_var", tv.bn1.running_var),
                         ("features.layer4.1.conv2.weight", tv.layer4[1].conv2.weight)):
        assert torch.equal(state[ours], theirs.detach()), ours


def _graphed_against_sgd(net, device, capture, watch_step=None, seeded=False, rtol=1e-4, atol=1e-6):
    """Three steps of ``net`` by GraphedStep (one warm-up, two replays) against ordinary SGD
    steps of a copy: the same weights and statistics. ``watch_step``: a dispatch mode active
    during the last step; ``seeded``: the same RNG state (dropout masks) for both."""
    import copy
    import torch.nn.functional as F
    from densenet.steps import GraphedStep
    from test_steps import _batches
    ref = copy.deepcopy(net)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
            for m in (net, ref)]
    step = GraphedStep(net, opts[0], device, 8, warmup=1, capture=capture)
    for i, (x, y) in enumerate(_batches([8, 8, 8])):
        x, y = x.to(device), y.to(device)
        if seeded:
            torch.manual_seed(100 + i)
        if i == 2 and watch_step is not None:
            with watch_step:
                step(x, y)
        else:
            step(x, y)
        if seeded:
            torch.manual_seed(100 + i)
        opts[1].zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        opts[1].step()
    assert step.replays == 2
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


def test_the_static_step_of_a_baseline_reads_nothing_back_and_trains_like_the_eager_one():
    """--cuda-graph's step (here uncaptured, on the CPU): the same weights as ordinary SGD steps
    on a Wide ResNet with dropout, and no op that reads a value back to the host."""
    from test_steps import _Ops
    torch.manual_seed(0)
    ops = _Ops()
    _graphed_against_sgd(create_model(TINY_WRN, num_classes=10, drop_rate=0.2).train(),
                         torch.device("cpu"), capture=False, watch_step=ops, seeded=True)
    assert ops.names and not [n for n in ops.names if "_local_scalar_dense" in n or "nonzero" in n]


def test_a_baseline_step_captured_on_the_device_trains_like_ordinary_steps(device):
    """On a GPU the step is really captured as one CUDA graph (``pytest -m cuda``); on the CPU
    it runs uncaptured. Either way: the weights of ordinary SGD steps."""
    torch.manual_seed(0)
    _graphed_against_sgd(create_model("resnet8", num_classes=10).to(device).train(), device,
                         capture=device.type == "cuda", rtol=1e-3, atol=1e-5)
