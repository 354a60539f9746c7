"""The prepared GPU check runs end to end on the CPU (``--quick``), so it cannot rot between the
rare runs on a GPU: every section produces its rows, correctness rows pass, the JSON is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_quick_on_the_cpu_runs_every_section_and_writes_its_table(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    doc = json.loads(out.read_text())
    failed = {row["row"] for row in doc["rows"] if row["status"] in ("FAIL", "ERROR")}
    assert not failed, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 == doc["exit_code"]
    assert doc["quick"] is True and doc["device"] == "cpu"
    sections = {row["section"] for row in doc["rows"]}
    assert sections == {"correctness", "speed", "depth", "densenet121", "train"}
    correctness = [row for row in doc["rows"] if row["section"] == "correctness"]
    assert len(correctness) == 21
    assert all(row["status"] == "PASS" for row in correctness)
    # with dropout: float32 gradients normwise, and the float64 step exact to rounding
    rows = {row["row"]: row for row in correctness}
    assert rows["densenet_bc28_k12 b8 fp32, dropout 0.2: gradients (normwise)"]["data"]["max_rel"] < 5e-3
    assert rows["densenet_bc28_k12 b8 fp64, dropout 0.2: parameter gradients"]["data"]["max_rel"] < 1e-9
    # the product's graphed step (uncaptured on the CPU) matches the eager step and replays
    speed = {row["row"]: row for row in doc["rows"] if row["section"] == "speed"}
    graphed = speed["ours CUDA graph (whole step)"]
    assert graphed["status"] == "PASS" and graphed["data"]["captured"] is False
    assert abs(graphed["data"]["replay_loss"] - graphed["data"]["eager_loss"]) < 1e-3
    # densenet train itself ran its epoch(s) and tested the result
    product = [row for row in doc["rows"] if row["row"].startswith("densenet train eager")]
    assert len(product) == 1 and len(product[0]["data"]["train_losses"]) >= 1
    assert 0.0 < product[0]["data"]["test_acc"] <= 1.0
    assert "| section | row | value | status | notes |" in proc.stdout
    assert "run directory:" not in proc.stdout  # the run's log goes to stderr with the progress


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_gpu_check_asked_for_cuda_without_one_exits_2_and_says_so():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "CUDA is not available here" in proc.stderr and "--device cpu" in proc.stderr


def test_gpu_check_refuses_an_unknown_section():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--only", "speed,nonsense"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown section(s) nonsense" in proc.stderr
