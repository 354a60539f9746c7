"""``benchmarks/volumes_vs_monai.py``'s measurement at a tiny size, in this process: both
DenseNet-121s (ours and MONAI's, the same architecture) and the depth sweep's DenseNet-BC."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "volumes_vs_monai.py"
spec = importlib.util.spec_from_file_location("volumes_vs_monai", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_ours_and_monai_densenet121_measured_alike():
    ours = bench.measure("d121", "efficient", size=32, batch=2, steps=1, threads=1)
    monai = bench.measure("monai", None, size=32, batch=2, steps=1, threads=1)
    assert ours["params"] == monai["params"]  # like for like: the same network
    for r in (ours, monai):
        assert len(r["times"]) == 1 and r["step_s"] > 0 and r["peak_mib"] > 0 and r["threads"] == 1


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_depth_sweep_measures_densenet_bc(implementation):
    r = bench.measure("bc", implementation, size=8, batch=1, steps=1, threads=1, depth=16)
    assert r["depth"] == 16 and r["peak_mib"] > 0 and r["step_s"] > 0


def test_paired_mode_alternates_both_models_in_one_process():
    r = bench.measure_paired(size=32, batch=2, pairs=2, threads=1)
    assert len(r["times"]["ours"]) == len(r["times"]["MONAI"]) == 2
    assert r["ours_s"] > 0 and r["monai_s"] > 0 and r["pair_ratio"] > 0 and r["threads"] == 1
