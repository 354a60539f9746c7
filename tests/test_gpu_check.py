"""The prepared GPU check runs end to end on the CPU (``--quick``), so it cannot rot between the
rare runs on a GPU: every section runs its commands and turns their output into rows, the device
tests pass, the table is printed and the JSON written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
DEVICE_TESTS = Path(__file__).resolve().parent / "test_devices.py"


def check(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_quick_on_the_cpu_runs_every_section_and_writes_its_table(tmp_path):
    out = tmp_path / "check.json"
    proc = check("--device", "cpu", "--quick", "--out", str(out))
    doc = json.loads(out.read_text())
    bad = [(r["row"], r["value"], r["notes"]) for r in doc["rows"] if r["status"] in ("FAIL", "ERROR", "SKIP")]
    assert not bad, proc.stderr[-3000:]
    assert proc.returncode == 0 == doc["exit_code"]
    assert doc["quick"] is True and doc["device"] == "cpu"
    rows = {(r["section"], r["row"]): r for r in doc["rows"]}
    assert {s for s, _ in rows} == {"tests", "speed", "train", "depth", "densenet121"}

    # one PASS row per CPU twin of the device tests, read from pytest's JUnit XML
    tests = [r for r in doc["rows"] if r["section"] == "tests"]
    defined = DEVICE_TESTS.read_text().count("\ndef test_")
    assert len(tests) >= defined and all(r["row"].endswith("]") and "cpu" in r["row"] for r in tests)
    assert all(r["status"] == "PASS" for r in tests)

    # the bench's numbers made it into rows: ours against torchvision, the modes, the depth fit
    ratios = rows[("speed", "densenet_bc16_k4 ours / torchvision")]["data"]
    assert ratios["train_speed_vs_tv_best"] > 0 and ratios["peak_vs_tv_plain"] > 0
    assert rows[("densenet121", "densenet121 ours / torchvision")]["data"]["infer_speed_vs_tv_best"] > 0
    assert {"eager_speed_vs_reference", "bf16_speed_vs_reference"} <= set(
        rows[("speed", "densenet_bc16_k4 bf16, eager: ratios")]["data"])
    assert "compile_speed_vs_reference" in rows[("speed", "densenet_bc16_k4 compile: ratios")]["data"]
    depth = [r for r in doc["rows"] if r["section"] == "depth"]
    assert {r["data"].get("variant") for r in depth if "variant" in r["data"]} == {"ours", "ours-ref"}
    assert rows[("depth", "ours: linear fit")]["data"]["mib_per_depth"] > 0

    # densenet train itself ran, tested its net and wrote its losses
    (train,) = [r for r in doc["rows"] if r["section"] == "train"]
    assert train["row"].startswith("densenet train eager") and len(train["data"]["train_losses"]) == 1
    assert 0.0 < train["data"]["test_accuracy"] <= 1.0

    # every command's output is kept beside the JSON
    assert all(Path(c["log"]).exists() and c["rc"] == 0 for c in doc["commands"])
    assert "| section | row | value | status | notes |" in proc.stdout
    assert "run directory:" not in proc.stdout  # the run's own log goes to its log file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_gpu_check_asked_for_cuda_without_one_exits_2_and_says_so():
    proc = check("--device", "cuda", "--quick", timeout=300)
    assert proc.returncode == 2
    assert "CUDA is not available here" in proc.stderr and "--device cpu" in proc.stderr


def test_gpu_check_refuses_an_unknown_section():
    proc = check("--device", "cpu", "--only", "speed,nonsense", timeout=300)
    assert proc.returncode == 2 and "unknown section(s) nonsense" in proc.stderr


def test_a_command_the_budget_no_longer_covers_is_a_skip_row(tmp_path):
    out = tmp_path / "check.json"
    proc = check("--device", "cpu", "--quick", "--only", "depth", "--budget-s", "1", "--out", str(out),
                 timeout=300)
    doc = json.loads(out.read_text())
    assert proc.returncode == 0
    assert [(r["section"], r["value"], r["status"]) for r in doc["rows"]] == [("depth", "not run", "SKIP")]
    assert "the 1 s budget is spent" in doc["rows"][0]["notes"]
