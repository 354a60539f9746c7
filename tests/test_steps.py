"""The captured training step (--cuda-graph): its SGD update, its static-tensor step and the
training loop around it. Capture itself needs a GPU (benchmarks/gpu_check.py runs it there);
here the same step runs uncaptured (``capture=False``) and is compared with the eager loop."""

import copy
import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import densenet.train as train_mod
from densenet import create_model
from densenet.errors import UsageError
from densenet.steps import GraphedStep, sgd_update
from test_train import TINY, make_folder_data


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 5))


def _sgd(net, nesterov=True):
    body, head = list(net[0].parameters()), list(net[2].parameters())
    return torch.optim.SGD([{"params": body, "lr": 0.05}, {"params": head, "lr": 0.2}],
                           lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-4)


def _grads(net, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_update_is_torch_sgd_with_tensor_learning_rates(nesterov):
    a = _net()
    b = copy.deepcopy(a)
    opt_a, opt_b = _sgd(a, nesterov), _sgd(b, nesterov)
    for net, opt in ((a, opt_a), (b, opt_b)):  # first step: the momentum buffers appear
        _grads(net, 0)
        opt.step()
    lrs = [torch.tensor(0.05), torch.tensor(0.2)]
    for seed in (1, 2, 3):
        _grads(a, seed)
        _grads(b, seed)
        opt_a.step()
        sgd_update(opt_b, lrs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_b.state[pb]["momentum_buffer"],
                                   opt_a.state[pa]["momentum_buffer"], rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in b.parameters()]
    lrs[0].fill_(0.0)  # the rate is read from the tensor: body frozen, head moves
    _grads(b, 4)
    sgd_update(opt_b, lrs)
    after = list(b.parameters())
    assert torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])


def test_sgd_update_says_what_it_needs():
    net = _net()
    opt = _sgd(net)
    _grads(net, 0)
    with pytest.raises(ValueError, match="momentum buffers of one ordinary optimizer.step"):
        sgd_update(opt, [torch.tensor(0.1), torch.tensor(0.1)])
    with pytest.raises(ValueError, match="1 learning rates for 2 parameter groups"):
        sgd_update(opt, [torch.tensor(0.1)])


def test_graphed_step_refuses_what_it_cannot_capture():
    net = _net()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphedStep(net, _sgd(net), torch.device("cpu"), 8)
    with pytest.raises(ValueError, match="torch.optim.SGD only"):
        GraphedStep(net, torch.optim.AdamW(net.parameters()), torch.device("cpu"), 8, capture=False)


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in sizes]


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_static_step_trains_like_the_eager_loop_without_reading_a_value():
    """Warm-up, the static step, a smaller last batch and a learning-rate change: the same
    weights, BN statistics and momentum as ordinary steps, with dropout; and no op that reads a
    tensor's value on the host (aten._local_scalar_dense, what .item() and bool() call)."""
    torch.manual_seed(0)
    net = create_model(TINY, num_classes=10, drop_rate=0.2).train()
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4)
    step = GraphedStep(net, opt, torch.device("cpu"), 8, label_smoothing=0.1, warmup=2,
                       capture=False)
    sizes = [8, 8, 8, 8, 5, 8, 8, 5]
    losses, ref_losses = [], []
    ops = _Ops()
    for i, (x, y) in enumerate(_batches(sizes)):
        if i == 5:  # a new epoch's rate
            for o in (opt, opt_ref):
                o.param_groups[0]["lr"] = 0.01
            step.set_lr()
        torch.manual_seed(100 + i)  # the same dropout masks for both
        if i == 6:
            with ops:
                loss, wrong = step(x, y)
        else:
            loss, wrong = step(x, y)
        losses.append(float(loss))
        torch.manual_seed(100 + i)
        opt_ref.zero_grad(set_to_none=True)
        logits = ref(x)
        l_ref = F.cross_entropy(logits, y, label_smoothing=0.1)
        l_ref.backward()
        opt_ref.step()
        ref_losses.append(float(l_ref.detach()))
        assert int(wrong) == int((logits.argmax(1) != y).sum())
    assert step.eager_steps == 2 + 2 and step.replays == 4  # 2 warm-up, 2 smaller batches
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for pa, pb in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[pa]["momentum_buffer"],
                                   opt_ref.state[pb]["momentum_buffer"], rtol=1e-4, atol=1e-6)
    assert any("densenet.dense_block" in n for n in ops.names)  # the efficient op ran
    assert not [n for n in ops.names if "_local_scalar_dense" in n or "nonzero" in n]


@pytest.fixture
def uncaptured(monkeypatch):
    """train(cuda_graph=True) on the CPU: the same loop with the step run uncaptured."""
    monkeypatch.setattr(train_mod, "GraphedStep", functools.partial(GraphedStep, capture=False))
    monkeypatch.setattr(train_mod, "check_graphable", lambda device, processes: None)


def test_the_graphed_training_loop_matches_the_eager_one(tmp_path, uncaptured):
    data = make_folder_data(tmp_path / "data", per_class=15)  # 45 images: batches 8 x 5 + 5
    kw = dict(epochs=3, batch_size=8, set_fields={"val_size": "0"}, quiet=True, seed=3,
              device="auto")
    eager = train_mod.train(TINY, "c10+", str(data), str(tmp_path / "eager"), **kw)
    graphed = train_mod.train(TINY, "c10+", str(data), str(tmp_path / "graphed"), cuda_graph=True,
                              **kw)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("eager", "graphed")]
    # the captured update rounds lr * g once more than torch's fused add (1 ulp); steps on a
    # 5-image batch amplify that over the epochs (the static step itself agrees to 1e-5, above)
    tolerance = [1e-6, 1e-4, 1e-3]
    for a, b, tol in zip(*rows, tolerance):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tol)
        assert a["train_error"] == b["train_error"] and a["lr"] == b["lr"]
    assert eager["epochs"] == graphed["epochs"] == 3
    config = json.loads((tmp_path / "graphed" / "config.json").read_text())
    assert config["cuda_graph"] is True


def test_the_graphed_loop_stops_on_a_non_finite_loss(tmp_path, uncaptured):
    data = make_folder_data(tmp_path / "data")
    with pytest.raises(UsageError, match=r"the training loss became (nan|inf) by step \d+ "
                                         r"\(epoch 1\); the run stopped"):
        train_mod.train(TINY, "c10+", str(data), str(tmp_path / "run"), epochs=1, batch_size=8,
                        lr=1e12, set_fields={"val_size": "0"}, quiet=True, device="auto",
                        cuda_graph=True)
    assert not (tmp_path / "run" / "last.pt").exists()  # no checkpoint of a broken model


def cli(*args):
    return subprocess.run([sys.executable, "-m", "densenet", "train", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph captures the training step on a GPU; use "
                                          "--device cuda"),
    (["--cuda-graph", "--compile"], "--cuda-graph and --compile are two ways to run the step"),
    (["--cuda-graph", "--set", "optimizer=adamw"], "--cuda-graph steps SGD (the paper's "
                                                   "optimizer), not adamw"),
])
def test_cuda_graph_option_errors(tmp_path, args, message):
    r = cli("--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--cuda-graph", "--compile"])
def test_how_the_step_runs_cannot_change_on_resume(tmp_path, flag):
    # the run keeps its own config; before, such a flag was silently dropped
    r = cli("--resume", str(tmp_path / "run"), flag)
    assert r.returncode == 2, r.stderr
    assert f"{flag} cannot change on --resume" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_graph_without_a_gpu_says_so_before_making_a_run_directory(tmp_path):
    r = cli("--out", str(tmp_path / "run"), "--cuda-graph")  # --device auto: the CPU here
    assert r.returncode == 2, r.stderr
    assert "this run's device is cpu. Use --device cuda" in r.stderr
    assert not (tmp_path / "run").exists()


def test_compiled_training_compiles_once_and_runs_the_last_batch_uncompiled(tmp_path):
    """--compile: full batches through the compiled model, the epoch's smaller last batch
    through the same module uncompiled, so its shape never triggers a second compilation."""
    from torch._dynamo.utils import counters
    data = make_folder_data(tmp_path / "data", per_class=15)  # batches 8 x 5 + 5
    torch._dynamo.reset()
    counters.clear()
    train_mod.train(TINY, "c10+", str(data), str(tmp_path / "run"), epochs=2, batch_size=8,
                    set_fields={"val_size": "0"}, quiet=True, device="cpu", compile=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()
