"""Training on several processes with torchrun + gloo on the CPU (issue: DDP)."""

import os
import subprocess
import sys

import pytest
import torch

from densenet.rundir import load_checkpoint

from faults import fault_env
from test_train import TINY, make_folder_data

# lr 0.01: float32 rounding (SyncBatchNorm sums x and x*x over processes) stays near 1e-6 over
# an epoch; at lr 0.1 the tiny batches amplify it past the 1e-5 tolerance
ARGS = ["--model", TINY, "--recipe", "c10", "--batch-size", "8", "--lr", "0.01", "--quiet",
        "--set", "val_size=0", "--set", "drop_rate=0", "--device", "cpu"]


def densenet(*args, env=None, timeout=300):
    e = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "densenet", "train", *args], capture_output=True,
                          text=True, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 48 images, global batch 8: 6 steps per epoch, 4 images per process with 2 processes
    return make_folder_data(tmp_path_factory.mktemp("ddp") / "data", per_class=16)


def test_two_processes_with_sync_bn_equal_one_process_with_the_same_global_batch(tmp_path, data):
    # SyncBatchNorm runs the plain dense-block path, so the 1-process run uses it too: the
    # efficient path agrees with it to 1e-14 in float64 (test_efficient), but on this tiny-batch
    # data float32 rounding differences grow to about 1% over six SGD steps
    one = densenet(*ARGS, "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "one"),
                   "--implementation", "reference")
    assert one.returncode == 0, one.stderr
    two = densenet(*ARGS, "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "two"),
                   "--nproc", "2", "--sync-bn")
    assert two.returncode == 0, two.stderr
    a = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "two" / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k  # num_batches_tracked: one update per step
    # one run directory, one set of checkpoints, written by rank 0 alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not [f for f in files if f.endswith(".tmp")]


def test_resume_with_a_different_number_of_processes(tmp_path, data):
    out = str(tmp_path / "run")
    first = densenet(*ARGS, "--data", str(data), "--epochs", "2", "--out", out, "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    more = densenet("--resume", out, "--nproc", "2", "--max-steps", "9", "--quiet")
    assert more.returncode == 0, more.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 9
    last = densenet("--resume", out, "--quiet")  # and back to one process
    assert last.returncode == 0, last.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 12
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]


def test_a_dying_rank_stops_the_job_and_keeps_the_last_checkpoint(tmp_path, data):
    out = str(tmp_path / "run")
    p = densenet(*ARGS, "--data", str(data), "--epochs", "3", "--out", out, "--nproc", "2",
                 env=fault_env(kill_at=(1, 8)))  # rank 1 dies in epoch 2
    assert p.returncode != 0
    assert "a training process failed" in p.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 6
    again = densenet("--resume", out, "--quiet")
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 3


def test_global_batch_must_divide_over_processes(tmp_path, data):
    p = densenet(*ARGS[:5], "7", *ARGS[6:], "--data", str(data), "--out", str(tmp_path / "r"),
                 "--nproc", "2")
    assert p.returncode == 2
    assert "does not divide over 2 processes" in p.stderr and "Traceback" not in p.stderr
