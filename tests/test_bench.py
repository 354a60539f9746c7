"""``densenet bench`` end to end on a tiny model: every variant measured in its own process, the
table, the ratios; and the two sides compute the same function (same weights)."""

import torch

from densenet.bench import build, compare, format_report, measure


def test_ours_and_torchvision_compute_the_same_function():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = [build("densenet_bc16_k4", v).eval()(x) for v in ("ours", "ours-ref", "tv", "tv-me")]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)


def test_measure_reports_speed_memory_and_page_faults():
    r = measure("densenet_bc16_k4", "ours", "train", batch=4, size=32, layout="channels_last",
                steps=2, warmup=1)
    assert len(r["times"]) == 2 and r["images_per_s"] > 0
    assert r["peak_mib"] > 0 and r["page_faults_per_step"] >= 0


def test_compare_runs_every_variant_and_prints_the_ratios():
    res = compare("densenet_bc16_k4", train_batch=4, infer_batch=4, size=32, steps=1, warmup=0,
                  repeats=1, device="cpu", log=lambda *a: None)
    assert set(res["summary"]) == {"train:ours", "train:tv", "train:tv-cl", "train:tv-me",
                                   "infer:ours", "infer:tv", "infer:tv-cl"}
    assert set(res["ratios"]) == {"train_speed_vs_tv_best", "train_speed_vs_tv_memory_efficient",
                                  "peak_vs_tv_plain", "peak_vs_tv_memory_efficient", "infer_speed_vs_tv_best"}
    # the plain torchvision model keeps every concatenation and BN output: more memory than ours
    assert res["ratios"]["peak_vs_tv_plain"] < 1
    text = format_report(dict(results=[res]))
    assert "| ours |" in text and "| tv-me |" in text and "ratios: train_speed_vs_tv_best" in text


def test_compare_modes_measures_both_paths_in_every_training_mode():
    from densenet.bench import compare_modes
    res = compare_modes("densenet_bc16_k4", batch=4, size=16, steps=1, warmup=0, repeats=1,
                        device="cpu", log=lambda *a: None)
    assert set(res["summary"]) == {f"{m}:{v}" for m in ("eager", "bf16", "compile") for v in ("ours", "ours-ref")}
    assert all(r["images_per_s"] > 0 and r["peak_mib"] > 0 for r in res["summary"].values())
    assert set(res["ratios"]) == {"eager_peak_vs_reference", "eager_speed_vs_reference", "bf16_peak_vs_reference",
                                  "bf16_speed_vs_reference", "compile_peak_vs_reference",
                                  "compile_speed_vs_reference", "compile_speed_vs_eager"}
    text = format_report(dict(results=[], modes=res))
    assert "| compile | ours |" in text and "compile_speed_vs_eager" in text


def test_bench_modes_takes_mode_names_and_refuses_unknown_ones(capsys):
    from densenet.cli import main
    assert main(["bench", "--modes", "eager,warp", "--model", "densenet_bc16_k4"]) == 2
    assert "--modes takes some of eager,bf16,compile (comma-separated), got 'eager,warp'" in capsys.readouterr().err


def test_compare_modes_runs_only_the_modes_named():
    from densenet.bench import compare_modes
    res = compare_modes("densenet_bc16_k4", batch=2, size=16, steps=1, warmup=0, repeats=1,
                        device="cpu", log=lambda *a: None, modes=["bf16"])
    assert set(res["summary"]) == {"bf16:ours", "bf16:ours-ref"}
    assert set(res["ratios"]) == {"bf16_peak_vs_reference", "bf16_speed_vs_reference"}
