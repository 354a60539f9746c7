"""The efficient path on each device: it computes what the plain (reference) modules compute,
in float32, float64, with dropout, under bf16 autocast and ``torch.compile``; its fused kernels
are the ones that run; and ``densenet train --cuda-graph`` trains like the eager loop.

Every test takes the ``device`` fixture (tests/conftest.py): ``pytest -m cuda`` runs the GPU
twins (what ``benchmarks/gpu_check.py --device cuda`` runs), ``pytest -m cpu`` the CPU ones. The
tolerances are those of tests/test_efficient.py and tests/test_ops.py, on either device.
"""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from densenet import backends, create_model, densenet_cifar
from densenet.errors import UsageError
from densenet.train import train
from test_train import TINY, make_folder_data

FP64 = 1e-10  # per tensor, relative to its largest entry (tests/test_efficient.py)
FP32 = 1e-5
# With dropout, float32 gradients are compared normwise over all of them: a ReLU input within
# float32 rounding of zero takes either side in two float32 computations, and one such element
# can move a BN bias gradient by ~3% of its largest entry (measured on the CPU, plain modules
# against a float64 step). The float64 twin then checks the two paths compute the same function.
FP32_DROPOUT_NORMWISE = 5e-3
# Under bf16 a random net's gradients at initialisation differ from float32 by 5-40% on either
# path: ours must be about as close to float32 as the plain modules' bf16 (tests/test_ops.py).
BF16_LOSS, BF16_GRAD_RATIO, BF16_GRAD_SLACK, BF16_VS_REF, BF16_STATS = 1e-2, 1.5, 0.02, 0.15, 2e-3
# Epoch-mean training losses of a --cuda-graph run against the eager run: the captured SGD update
# rounds once more (1 ulp a step) and cuDNN's backward is not bitwise deterministic, so the runs
# drift apart slowly (1e-3 after three epochs of a tiny net on the CPU, tests/test_steps.py).
TRAIN_LOSS = 2e-2

CASES = {
    "DenseNet-BC": (lambda **kw: densenet_cifar(16, growth_rate=4, **kw), (4, 3, 16, 16)),
    "ImageNet stem": (lambda **kw: create_model("densenet121", block_config=(2, 3), num_classes=7, **kw),
                      (2, 3, 40, 40)),
}


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def full_float32(device):
    """No TF32 on CUDA (cuDNN's convolutions use it by default): float32 compared with float32."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:  # torch >= 2.9; mixing it with the allow_tf32 flags is an error
        old = conv, torch.backends.cuda.matmul.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make(case, device, dtype=torch.float32, **kw):
    """The case's model (seed 0) and an input batch, on ``device``."""
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build(**kw).to(device, dtype)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def step(model, x, implementation, channels_last=False, seed=1, amp=False, compile=False):
    """One training forward and backward (cross-entropy) of a copy of ``model`` on that path,
    dropout masks drawn from ``seed``: loss, output, input and parameter gradients and BN
    buffers, as float64 on the CPU."""
    model = copy.deepcopy(model).set_implementation(implementation).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    call = torch.compile(model) if compile else model
    x = x.contiguous(memory_format=fmt).clone().requires_grad_(True)
    y = torch.arange(len(x), device=x.device) % model.classifier.out_features
    torch.manual_seed(seed)  # seeds every CUDA device too: the same masks on both paths
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = call(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    got = dict(loss=loss, out=out, dx=x.grad,
               **{"grad:" + k: p.grad for k, p in model.named_parameters()},
               **{"buffer:" + k: b for k, b in model.state_dict().items()})
    return {k: v.detach().double().cpu() for k, v in got.items()}


def worst(ref, got, keys=None):
    """(relative difference, key) of the tensor that differs most, each relative to its largest
    entry. An analytically zero gradient (the stem BN's weight, whose scale the next BN removes)
    is compared relative to 1e-4 of the largest gradient instead of its rounding noise."""
    assert ref.keys() == got.keys()
    grad_scale = max(v.abs().max().item() for k, v in ref.items() if k.startswith("grad:"))
    out = (0.0, "-")
    for key in keys or ref:
        floor = 1e-4 * grad_scale if key.startswith("grad:") else 1e-30
        rel = ((got[key] - ref[key]).abs().max() / ref[key].abs().max().clamp_min(floor)).item()
        out = max(out, (rel, key))
    return out


def normwise(ref, got, prefixes=("dx", "grad:")):
    """norm(got - ref) / norm(ref) over the input and parameter gradients together."""
    keys = [k for k in ref if k.startswith(prefixes)]
    a, b = (torch.cat([d[k].flatten() for k in keys]) for d in (ref, got))
    return ((b - a).norm() / a.norm()).item()


def assert_same(ref, got, tol, keys=None):
    rel, key = worst(ref, got, keys)
    assert rel < tol, f"{key}: relative difference {rel:.2e}, tolerance {tol:g}"


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_efficient_path_matches_reference_in_float32(device, case, channels_last):
    model, x = make(case, device)
    with full_float32(device):
        ref = step(model, x, "reference", channels_last)
        got = step(model, x, "efficient", channels_last)
    # The stem BN's gradients are sums that cancel almost exactly: every consumer of its output
    # is a training-mode BN, which removes shift and scale, so only the ReLU in between leaves
    # them non-zero (the weight's is zero at initialisation, the bias's 2e-3 of the largest
    # gradient). In float32 they are rounding noise of larger terms (measured 1e-5 to 1e-1
    # relative on the CPU, every other tensor under 3e-6), so they are checked in float64 only.
    assert_same(ref, got, FP32, keys=[k for k in ref if not k.startswith("grad:features.norm0.")])


@pytest.mark.parametrize("case", CASES)
def test_efficient_path_matches_reference_in_float64(device, case):
    model, x = make(case, device, torch.float64)
    assert_same(step(model, x, "reference"), step(model, x, "efficient"), FP64)


def test_with_dropout_float32_gradients_agree_normwise_and_float64_exactly(device):
    model, x = make("DenseNet-BC", device, drop_rate=0.2)
    with full_float32(device):
        ref, got = step(model, x, "reference"), step(model, x, "efficient")
    assert_same(ref, got, FP32, keys=[k for k in ref if k in ("loss", "out") or k.startswith("buffer:")])
    err = normwise(ref, got)
    assert err < FP32_DROPOUT_NORMWISE, f"gradients: normwise difference {err:.2e}"
    model, x = make("DenseNet-BC", device, torch.float64, drop_rate=0.2)
    assert_same(step(model, x, "reference"), step(model, x, "efficient"), FP64)


@pytest.mark.parametrize("drop_rate", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_bf16_autocast_is_as_close_to_float32_as_the_plain_modules(device, drop_rate):
    model, x = make("DenseNet-BC", device, drop_rate=drop_rate)
    with full_float32(device):
        f32 = step(model, x, "reference")
    ref, ours = step(model, x, "reference", amp=True), step(model, x, "efficient", amp=True)
    rel, _ = worst(f32, ours, ["loss"])
    assert rel < BF16_LOSS, f"loss: relative difference to float32 {rel:.2e}"
    err = {"ref": normwise(f32, ref), "ours": normwise(f32, ours)}
    assert err["ours"] < BF16_GRAD_RATIO * err["ref"] + BF16_GRAD_SLACK, err
    assert normwise(ref, ours) < BF16_VS_REF
    for key in (k for k in ref if k.endswith(("running_mean", "running_var"))):
        diff = (ours[key] - ref[key]).abs().max().item()
        assert diff < BF16_STATS * max(1.0, ref[key].abs().max().item()), (key, diff)


def test_torch_compile_trains_without_graph_breaks_and_matches_the_reference(device):
    torch._dynamo.reset()
    model, x = make("DenseNet-BC", device)
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "\n".join(g.code for g in explanation.graphs).count("torch.ops.densenet.dense_block") == 3
    with full_float32(device):
        ref, got = step(model, x, "reference"), step(model, x, "efficient", compile=True)
    torch._dynamo.reset()
    assert_same(ref, got, FP32)


FUSED = ("bn_relu", "bn_relu_grad", "bn_grad_apply", "col_affine_add")  # on both devices


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
def test_the_fused_kernels_run_on_the_device(device, monkeypatch, amp):
    """The registered kernels look their functions up in densenet.ops.cpu / densenet.ops.cuda
    at every call, so counting calls there tells whether a step ran them (C on the CPU, Triton
    on CUDA) or fell back to torch ops; with the backend's setting off, none runs."""
    if device.type == "cuda":
        from densenet.ops import cuda as kernels
        assert kernels.available(), "Triton is not importable: the CUDA kernels cannot run"
        setting = "triton"
    else:
        from densenet.ops import cpu as kernels
        if not kernels.available():
            pytest.skip(f"C kernels unavailable: {kernels.unavailable_reason()}")
        setting = "cpu_kernels"
    calls = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        def counted(*args, _fn=getattr(kernels, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    model, x = make("DenseNet-BC", device)
    step(model, x, "efficient", channels_last=True, amp=amp)
    assert all(calls.values()), calls
    calls.update(dict.fromkeys(FUSED, 0))
    with backends.flags(**{setting: False}):
        step(model, x, "efficient", channels_last=True, amp=amp)
    assert not any(calls.values()), calls


def test_densenet_train_with_cuda_graph_follows_the_eager_run(device, tmp_path):
    """``densenet train`` eagerly and with the whole step captured as one CUDA graph: the same
    epoch losses, over 3 epochs of 5 full batches and a smaller last one (run eagerly on the
    graph's tensors) and a learning-rate step. On the CPU, where --cuda-graph is refused, a
    second eager run must repeat the first."""
    data = make_folder_data(tmp_path / "data", per_class=15)
    kw = dict(epochs=3, batch_size=8, set_fields={"val_size": "0"}, seed=0, quiet=True,
              workers=0, device=device.type)
    train(TINY, "c10+", str(data), str(tmp_path / "eager"), **kw)
    if device.type == "cuda":
        train(TINY, "c10+", str(data), str(tmp_path / "other"), cuda_graph=True, **kw)
    else:
        with pytest.raises(UsageError, match="--cuda-graph captures the training step on a GPU"):
            train(TINY, "c10+", str(data), str(tmp_path / "refused"), cuda_graph=True, **kw)
        train(TINY, "c10+", str(data), str(tmp_path / "other"), **kw)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("eager", "other")]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=TRAIN_LOSS), (a, b)
