"""Kill-safe runs, non-finite losses, a full disk, and bad input at every entry point."""

import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import densenet.train as train_mod
from densenet.rundir import load_checkpoint
from densenet.cli import main
from densenet.train import train

from faults import fault_env
from test_train import TINY, make_folder_data

RUN = ["--model", TINY, "--recipe", "c10+", "--batch-size", "8", "--epochs", "3", "--seed", "5",
       "--set", "val_size=6", "--set", "drop_rate=0.1", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_data(tmp_path_factory.mktemp("rel") / "data")


def _cmd(*args):
    return [sys.executable, "-m", "densenet", "train", *args]


def _assert_readable(run_dir):
    """What a user (or --resume) reads from a run directory must parse at every moment."""
    if (run_dir / "config.json").exists():
        json.loads((run_dir / "config.json").read_text())
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            load_checkpoint(run_dir / name)  # verifies the checksum


def test_a_run_killed_at_random_moments_resumes_to_the_same_weights(tmp_path, data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    ref = subprocess.run(_cmd(*RUN, "--data", str(data), "--out", str(tmp_path / "ref")), env=env,
                         capture_output=True, text=True, timeout=300)
    ref_s = time.monotonic() - t0  # the kills below fall inside a run, however fast the machine
    assert ref.returncode == 0, ref.stderr
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    # first a kill inside a checkpoint write (temporary file complete, rename not yet done) ...
    p = subprocess.run(_cmd(*RUN, "--data", str(data), "--out", str(run_dir)), timeout=300,
                       env=fault_env(env, kill_in_write=5), capture_output=True)
    assert p.returncode == -signal.SIGKILL
    _assert_readable(run_dir)
    # ... then kills at random moments, resuming each time, then a resume left to finish
    for attempt in range(5):
        proc = subprocess.Popen(_cmd("--resume", str(run_dir), "--quiet"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.2, 0.7) * ref_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        _assert_readable(run_dir)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()
    assert kills >= 1
    last = subprocess.run(_cmd("--resume", str(run_dir), "--quiet"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(run_dir / "last.pt")
    assert b["epoch"] == 3
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert not list(run_dir.glob(".*.tmp"))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def diverging(logits, target, *a, **k):
        calls["n"] += 1
        loss = real(logits, target, *a, **k)
        return loss * float("nan") if calls["n"] == 6 else loss  # step 6: epoch 2

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", diverging)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"became nan at step 5 \(epoch 2\).*last good checkpoint is .*last\.pt"):
        train(TINY, "c10+", str(data), str(out), epochs=3, batch_size=8, quiet=True,
              set_fields={"val_size": "6"})
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    train(resume=str(out), quiet=True)
    assert load_checkpoint(out / "last.pt")["epoch"] == 3


def test_disk_full_during_training_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    real = train_mod.save_checkpoint
    saves = {"n": 0}

    def fills_disk(path, payload):
        saves["n"] += 1
        if saves["n"] == 3:  # epoch 2's best.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(train_mod, "save_checkpoint", fills_disk)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="No space left on device.*previous checkpoint there is intact"):
        train(TINY, "c10+", str(data), str(out), epochs=3, batch_size=8, quiet=True,
              set_fields={"val_size": "0"})
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def _run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    return code, err.getvalue()


values = st.one_of(
    st.integers(-5, 5).map(str), st.sampled_from(["nan", "inf", "-inf", "1e309", "0.0", "-0.1", "",
                                                   "abc", "1,2", "true", "None", "3.5", "-"]),
    st.text(min_size=0, max_size=8))
flags = st.sampled_from(["--epochs", "--batch-size", "--lr", "--seed", "--device", "--amp",
                         "--max-steps", "--workers", "--model", "--recipe", "--data", "--set",
                         "--resume"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(flags, values), max_size=4), extra=st.lists(values, max_size=2))
def test_random_arguments_end_in_success_or_a_clear_error(tmp_path, data, pairs, extra):
    out = tmp_path / f"r{time.monotonic_ns()}"
    argv = ["train", "--model", TINY, "--data", str(data), "--out", str(out), "--max-steps", "1",
            "--quiet", "--set", "val_size=6"]
    for flag, value in pairs:
        argv += [flag, value]
    argv += extra
    code, err = _run_cli(argv)
    assert code in (0, 2), (argv, err)
    assert "internal error" not in err and "Traceback" not in err, (argv, err)
    if code == 2:
        assert "error" in err


config_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
              st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(
    ["model", "recipe", "epochs", "batch_size", "lr", "momentum", "nesterov", "lr_milestones",
     "augment", "normalize", "drop_rate", "val_size", "seed", "device", "amp", "max_steps",
     "workers", "quiet", "colour", "selection", "input_size"]), config_values, max_size=3))
def test_malformed_run_configs_end_in_success_or_a_clear_error(tmp_path, data, changes):
    run_dir = tmp_path / f"r{time.monotonic_ns()}"
    run_dir.mkdir()
    config = train_mod.make_config(TINY, "c10+", str(data), str(run_dir), epochs=1, batch_size=8,
                                   set_fields={"val_size": "6"}, quiet=True).to_dict()
    config.update(changes)
    (run_dir / "config.json").write_text(json.dumps(config))
    code, err = _run_cli(["train", "--resume", str(run_dir), "--max-steps", "1", "--quiet"])
    assert code in (0, 2), (changes, err)
    assert "internal error" not in err and "Traceback" not in err, (changes, err)


def test_debug_shows_the_traceback(tmp_path):
    code, err = _run_cli(["--debug", "train", "--recipe", "nope"])
    assert code == 2 and "Traceback" in err and "unknown recipe" in err
    code, err = _run_cli(["train", "--recipe", "nope"])
    assert code == 2 and "Traceback" not in err


other_commands = st.sampled_from(["recipes", "models", "summary", "eval", "predict", "cam",
                                  "export", "analyze", "plot", "report", "bench"])
other_flags = st.sampled_from(["--show", "--json", "--input-size", "--num-classes", "--data",
                               "--split", "--batch-size", "--topk", "--format", "--out", "--kind",
                               "--weights", "--model", "--device", "--tolerance", "--steps",
                               "--class", "--size"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=other_commands, positional=st.lists(values, max_size=2),
       pairs=st.lists(st.tuples(other_flags, values), max_size=3))
def test_random_arguments_to_every_other_command_end_cleanly(tmp_path, command, positional, pairs):
    argv = [command, *positional]
    for flag, value in pairs:
        argv += [flag, value]
    if command == "bench":
        argv += ["--model", "nope"]  # never start a real benchmark from a property test
    if command in ("summary", "models") and not positional and not pairs:
        argv += ["--json"]
    code, err = _run_cli(argv)
    assert code in (0, 1, 2), (argv, err)
    assert "internal error" not in err and "Traceback" not in err, (argv, err)
