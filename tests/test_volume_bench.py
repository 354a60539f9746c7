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


PROFILE = Path(__file__).resolve().parents[1] / "benchmarks" / "volumes_profile.py"
profile_spec = importlib.util.spec_from_file_location("volumes_profile", PROFILE)
profiler = importlib.util.module_from_spec(profile_spec)
profile_spec.loader.exec_module(profiler)


@pytest.mark.parametrize("name, shapes, row", [
    ("aten::mkldnn_convolution", [[2, 128, 16, 16, 16], [32, 128, 3, 3, 3]], "3x3x3 convolutions at 16^3, forward"),
    ("aten::convolution_backward", [[2, 32, 4, 4, 4], [2, 128, 4, 4, 4], [32, 128, 3, 3, 3]],
     "3x3x3 convolutions at 4^3, backward"),
    ("aten::mkldnn_convolution", [[1, 256, 1024, 1], [128, 256, 1, 1]], "1x1 convolutions, forward"),
    ("aten::_slow_conv2d_backward", [[1, 128, 64, 1], [1, 256, 64, 1], [128, 256, 1, 1]],
     "1x1 convolutions, backward"),
    ("aten::mm", [[1024, 128], [128, 256]], "1x1 convolutions, backward"),
    ("aten::convolution_backward", [[2, 64, 32, 32, 32], [2, 1, 64, 64, 64], [64, 1, 7, 7, 7]],
     "stem convolution, backward"),
    ("densenet::fused_bn_relu_grad", [[4096, 128]], "fused element-wise kernels (ours)"),
    ("aten::native_batch_norm_backward", [[2, 128, 8, 8, 8]], "BN and ReLU (ATen)"),
    ("aten::max_pool3d_with_indices", [[2, 64, 32, 32, 32]], "pooling (ATen)"),
    ("aten::add_", [[32, 128, 3, 3, 3], [32, 128, 3, 3, 3]], "everything else"),
])
def test_profile_rows_sort_operators_by_kind_of_work(name, shapes, row):
    assert profiler.category(name, shapes) == row


def test_profile_of_both_models_by_kind_of_work():
    r = profiler.profile_both(size=32, batch=2, steps=1, threads=1)
    ours, monai = r["runs"]["ours"], r["runs"]["MONAI"]
    for run in (ours, monai):
        # DenseNet-121 at 32^3: the blocks see 8^3, 4^3, 2^3 and 1^3 volumes
        for side in (8, 4, 2, 1):
            assert run["rows"][f"3x3x3 convolutions at {side}^3, backward"] > 0
        assert run["ops"] > 0 and run["step_s"] > 0
        assert abs(sum(run["rows"].values()) - run["profiled_ms"]) < 1e-6
        known = {"1x1 convolutions, forward", "1x1 convolutions, backward", "stem convolution, forward",
                 "stem convolution, backward", "fused element-wise kernels (ours)", "BN and ReLU (ATen)",
                 "concatenation, gradient sums (ATen)", "pooling (ATen)", "everything else"}
        assert all(k in known or k.startswith("3x3x3 convolutions at ") for k in run["rows"])
        assert run["rows"]["1x1 convolutions, backward"] > 0 and run["rows"]["stem convolution, forward"] > 0
    assert ours["rows"]["fused element-wise kernels (ours)"] > 0
    assert "fused element-wise kernels (ours)" not in monai["rows"]
    assert monai["rows"]["BN and ReLU (ATen)"] > 0
    text = profiler.table(r)
    assert "| 3x3x3 convolutions at 8^3, backward |" in text and "| operators a step |" in text
