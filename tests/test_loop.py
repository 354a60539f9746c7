"""The training loop: one epoch loop over a step that reads nothing back, the losses read back
every READ_EVERY steps, the training state as one record, run options derived from the config's
fields, and progress that suits where stderr goes."""

import contextlib
import io
import math
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import densenet.train as train_mod
from densenet.cli import main
from densenet.errors import UsageError
from densenet.rundir import load_checkpoint, save_checkpoint
from densenet.train import READ_EVERY, TrainState, train

from test_train import TINY, make_folder_data

N = READ_EVERY


@pytest.fixture(scope="module")
def long_epoch(tmp_path_factory):
    """210 images in batches of 2: an epoch of 105 steps, more than 2 * READ_EVERY."""
    assert 2 * N < 105
    return make_folder_data(tmp_path_factory.mktemp("loop") / "data", per_class=70)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """36 images, 6 held out, batches of 8: 4 steps per epoch."""
    return make_folder_data(tmp_path_factory.mktemp("small") / "data")


def _long(data, out, **kw):
    kw.setdefault("epochs", 1)
    kw.setdefault("quiet", True)
    return train(TINY, "c10+", str(data), str(out), batch_size=2, seed=1,
                 set_fields={"val_size": "0"}, **kw)


def _small(data, out, **kw):
    kw.setdefault("epochs", 3)
    kw.setdefault("quiet", True)
    return train(TINY, "c10+", str(data), str(out), batch_size=8, seed=3,
                 set_fields={"val_size": "6", "drop_rate": "0.2"}, **kw)


# ----------------------------------------------------------------------------- host reads

# Every way Python reads a tensor's value (each waits for a GPU to finish its queue), and the
# ops that read one inside ATen (item() shows twice: once here, once as _local_scalar_dense).
TENSOR_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
                "__complex__", "__array__", "__repr__", "__format__")
TORCH_READS = ("equal", "allclose", "is_nonzero")
ATEN_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero",
              "aten.masked_select", "aten._unique", "aten.unique")


class _AtenReads(TorchDispatchMode):
    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(ATEN_READS):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_reads(monkeypatch):
    """Counts the host reads of each training epoch: [(steps, [what read]), ...]."""
    epochs = []
    reads = None

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            if reads is not None:
                reads.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    for name in TENSOR_READS:
        wrap(torch.Tensor, name)
    for name in TORCH_READS:
        wrap(torch, name)
    real_epoch = train_mod._Run._train_epoch

    def epoch(self, step, loader, e):
        nonlocal reads
        reads = []
        before = self.state.step
        try:
            with _AtenReads(reads):
                return real_epoch(self, step, loader, e)
        finally:
            epochs.append((self.state.step - before, reads))
            reads = None

    monkeypatch.setattr(train_mod._Run, "_train_epoch", epoch)
    return epochs


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_an_epoch_reads_the_losses_back_once_every_read_every_steps(tmp_path, long_epoch,
                                                                     count_reads, implementation):
    """105 steps, READ_EVERY 50: three reads (after steps 50 and 100, and the epoch's end, which
    also checks the last 5 losses before a checkpoint), each one transfer; nothing else in the
    loop (the data, the step, the optimizer, the model) waits for the device."""
    _long(long_epoch, tmp_path / "run", implementation=implementation)
    [(steps, reads)] = count_reads
    assert steps == 105
    assert len(reads) <= math.ceil(steps / N), reads
    assert reads == ["tolist"] * 3


# ----------------------------------------------------------------------------- non-finite losses

def test_a_non_finite_loss_stops_the_run_naming_its_step_and_the_steps_read_with_it(
        tmp_path, long_epoch, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, *a, **k):
        calls["n"] += 1
        loss = real(logits, target, *a, **k)
        return loss * float("nan") if calls["n"] == 60 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(UsageError) as e:
        _long(long_epoch, tmp_path / "run")
    msg = str(e.value)
    assert "the training loss became nan by step 100 (epoch 1); the run stopped" in msg
    assert "between steps 51 and 100 (epoch 1)" in msg
    assert "became nan at step 60 (epoch 1)" in msg and "No checkpoint was written yet" in msg
    assert calls["n"] == 100  # found at the read after step 100, before any more steps
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_diverging_learning_rate_stops_the_run_before_a_checkpoint_of_that_epoch(tmp_path,
                                                                                    small):
    with pytest.raises(UsageError, match=r"became (nan|inf) at step \d \(epoch 1\)"):
        _small(small, tmp_path / "run", lr=1e30)
    assert not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------- the state record

def _same(a, b, where="state"):
    """Equal, with tensors compared by value, tuples and lists alike."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_training_state_round_trips_through_a_checkpoint(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = TrainState(epoch=2, step=17, step_in_epoch=3,
                       history=[{"epoch": 1, "train_loss": 1.5, "val_error": None},
                                {"epoch": 2, "train_loss": 1.25, "val_error": 0.5}],
                       best={"val_error": 0.5, "epoch": 2},
                       pretrained={"weights": "w.pth", "new_head": True},
                       optimizer=opt.state_dict(), rng=[train_mod._rng_state(torch.device("cpu"))])
    save_checkpoint(tmp_path / "last.pt", {"model": {"name": "linear"}, "state_dict": net.state_dict(),
                                          **state.to_dict()})
    back = TrainState.from_dict(load_checkpoint(tmp_path / "last.pt"))
    for name in TrainState.KEYS:
        _same(getattr(back, name), getattr(state, name), name)


def test_a_checkpoint_holds_the_documented_keys(tmp_path, small):
    _small(small, tmp_path / "run", epochs=1)
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert set(payload) == {"model", "state_dict", "classes", "preprocess", "pretrained", "epoch",
                            "step", "step_in_epoch", "optimizer", "rng", "config", "history",
                            "best", "params"}  # docs/run-directory.md


def test_a_checkpoint_of_the_first_format_resumes_to_the_same_weights(tmp_path, small):
    """The first format kept one random state (a dict, not one per process) and no
    ``pretrained``, ``params`` or later keys."""
    _small(small, tmp_path / "full")
    _small(small, tmp_path / "cut", max_steps=5)  # stops mid-epoch 2
    path = tmp_path / "cut" / "last.pt"
    payload = load_checkpoint(path)
    old = {k: payload[k] for k in ("model", "state_dict", "classes", "preprocess", "epoch", "step",
                                   "step_in_epoch", "optimizer", "config", "history", "best")}
    old["rng"] = payload["rng"][0]
    save_checkpoint(path, old)
    train(resume=str(tmp_path / "cut"), quiet=True)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(path)
    assert b["epoch"] == 3 and b["step"] == a["step"] == 12
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_a_file_without_training_state_is_refused_on_resume(tmp_path, small):
    _small(small, tmp_path / "run", epochs=1)
    path = tmp_path / "run" / "last.pt"
    payload = load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "optimizer"})
    with pytest.raises(UsageError, match="holds no training state \\(optimizer missing\\)"):
        train(resume=str(tmp_path / "run"), quiet=True)


# ----------------------------------------------------------------------------- options

def _cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


# a value for every run field: a new field without one here fails the test below
SAMPLES = {"model": TINY, "recipe": "c10", "data": "somewhere", "out": "elsewhere",
           "weights": "w.pth", "freeze": "features", "new_head": True, "download": True,
           "seed": 0, "device": "cpu", "amp": "bf16", "channels_last": True, "compile": True,
           "cuda_graph": True, "sync_bn": True, "implementation": "reference", "max_steps": 1,
           "workers": 0, "quiet": True, "log": "tensorboard"}


def test_every_run_field_is_resumable_or_refused_alike_in_the_api_and_the_cli(tmp_path):
    assert set(SAMPLES) == set(train_mod.RUN_FIELDS)
    missing = str(tmp_path / "no-run")
    for name, value in SAMPLES.items():
        resumable = name in train_mod.RESUMABLE
        with pytest.raises(UsageError) as e:
            train(resume=missing, **{name: value})
        api = str(e.value)
        flag = train_mod.option_flag(name)
        code, cli = _cli(["train", "--resume", missing, flag] + ([] if value is True else [str(value)]))
        assert code == 2, (name, cli)
        if resumable:  # accepted, then the run directory is found missing
            assert "no config.json there" in api and "no config.json there" in cli, (name, api, cli)
        else:
            assert f"{flag} cannot change on --resume" in api, (name, api)
            assert f"{flag} cannot change on --resume" in cli, (name, cli)
    # the lists that used to be kept by hand and disagreed on --sync-bn
    assert {"max_steps", "quiet", "device", "workers", "sync_bn"} <= set(train_mod.RESUMABLE)
    code, cli = _cli(["train", "--resume", missing, "--seed", "1"])
    assert "Only --download, --device, --sync-bn, --max-steps, --workers, --quiet can" in cli


@pytest.mark.parametrize("flag, value", [("--epochs", "2"), ("--batch-size", "4"), ("--lr", "1"),
                                         ("--set", "val_size=0")])
def test_recipe_fields_are_refused_on_resume_by_both(tmp_path, flag, value):
    missing = str(tmp_path / "no-run")
    code, cli = _cli(["train", "--resume", missing, flag, value])
    assert code == 2 and f"{flag} cannot change on --resume" in cli
    kwargs = ({"set_fields": {"val_size": "0"}} if flag == "--set"
              else {flag[2:].replace("-", "_"): value})
    with pytest.raises(UsageError, match=f"{flag} cannot change on --resume"):
        train(resume=missing, **kwargs)


def test_a_resume_keeps_or_replaces_each_field_as_its_metadata_says(tmp_path, small):
    _small(small, tmp_path / "run", max_steps=2, workers=1, device="cpu")
    seen = {}
    real = train_mod._Run.fit

    def fit(self, checkpoint, resumed):
        seen.update(workers=self.cfg.workers, device=self.cfg.device,
                    max_steps=self.cfg.max_steps, quiet=self.cfg.quiet, seed=self.cfg.seed)
        return real(self, checkpoint, resumed)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_mod._Run, "fit", fit)
        train(resume=str(tmp_path / "run"), workers=2, max_steps=3)
    # kept: the run's own unless given; anew: this invocation's or the default
    assert seen == {"workers": 2, "device": "cpu", "max_steps": 3, "quiet": False, "seed": 3}


# ----------------------------------------------------------------------------- progress

def test_progress_to_a_pipe_is_plain_lines_not_redraws(tmp_path, long_epoch):
    """51 steps of an epoch of 105: a bar would write a redraw for each into a file; a plain
    line comes at the first read (step 50), and the stop's own line on stdout."""
    p = subprocess.run([sys.executable, "-m", "densenet", "train", "--model", TINY, "--recipe",
                        "c10+", "--data", str(long_epoch), "--batch-size", "2", "--set",
                        "val_size=0", "--max-steps", "51", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"epoch 1/300 step 50/105: train loss \d+\.\d{4} err \d+\.\d\d%, "
                        r"\d+ img/s", lines[0]), lines
    assert "stopped after --max-steps 51" in p.stdout


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress(monkeypatch, stream, seconds, quiet=False):
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(train_mod._Progress, "LINE_SECONDS", seconds)
    progress = train_mod._Progress(105, 0, 1, 3, quiet)
    for done in range(1, 106):
        progress.step()
        if done % N == 0 or done == 105:
            progress.read(done, loss=1.5, err=40.0, ips=100.0, line=done < 105)
    progress.close()
    return stream.getvalue()


def test_plain_progress_lines_come_at_reads_at_most_every_line_seconds(monkeypatch):
    every_read = _progress(monkeypatch, io.StringIO(), 0.0)
    assert every_read.splitlines() == [
        "epoch 1/3 step 50/105: train loss 1.5000 err 40.00%, 100 img/s",
        "epoch 1/3 step 100/105: train loss 1.5000 err 40.00%, 100 img/s"]  # none at the end
    assert [line[:22] for line in _progress(monkeypatch, io.StringIO(), 3600.0).splitlines()] == [
        "epoch 1/3 step 50/105:"]  # the first read's, then none for an hour
    assert _progress(monkeypatch, io.StringIO(), 0.0, quiet=True) == ""


def test_a_terminal_gets_a_bar(monkeypatch):
    out = _progress(monkeypatch, _Terminal(), 0.0)
    assert "\r" in out and "epoch 1/3" in out and "/105" in out  # redrawn in place
    assert "train loss" not in out  # no plain lines
