"""The memory-efficient engine on signals (1-D) and volumes (3-D): the same outputs, gradients
and BatchNorm running statistics as the plain modules, with the ``densenet::`` ops actually
running (a silent fallback to the modules fails these tests), under bf16 autocast,
``torch.compile`` and ``torch.export``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from densenet import densenet_cifar
from densenet.model import DenseNet
from densenet.ops import rows

from test_efficient import _assert_same, path  # noqa: F401  (the fixture: kernels, torch ops, small chunks)

SIZES = {1: 32, 3: 8}  # a side per spatial dimension: two transitions halve it to 8 and 2


class _OpCalls(TorchDispatchMode):
    """Counts the ``densenet::`` ops dispatched (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("densenet."):
            key = name.split(".")[1]
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _cifar(dims, depth=16, growth_rate=4, bottleneck=True, **kw):
    torch.manual_seed(0)
    if not bottleneck:
        kw.setdefault("compression", 1.0)
    return densenet_cifar(depth, growth_rate=growth_rate, bottleneck=bottleneck, spatial_dims=dims,
                          in_channels=2, num_classes=5, **kw)


def _imagenet_stem(dims):
    """A small net with the ImageNet stem (7-conv/2, BN-ReLU-max-pool/2) in ``dims`` dimensions."""
    torch.manual_seed(0)
    return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, spatial_dims=dims,
                    in_channels=1, num_classes=3)


def _step(model, x, implementation, seed=1, channels_last=False, count=False):
    model = copy.deepcopy(model).set_implementation(implementation).train()
    x = rows.to_layout(x.clone(), channels_last).requires_grad_(True)
    torch.manual_seed(seed)
    mode = _OpCalls()
    if count:
        with mode:
            out = model(x)
            (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype, device=out.device)).square().sum().backward()
    else:
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype, device=out.device)).square().sum().backward()
    result = dict(out=out.detach(), dx=x.grad,
                  **{"grad:" + k: p.grad for k, p in model.named_parameters()},
                  **{"buffer:" + k: b for k, b in model.state_dict().items()})
    return result, mode.calls


CASES = {
    "DenseNet-BC": dict(depth=16, bottleneck=True),
    "basic DenseNet": dict(depth=13, bottleneck=False),
    "DenseNet-BC with dropout": dict(depth=16, bottleneck=True, drop_rate=0.2),
    "basic with dropout": dict(depth=13, bottleneck=False, drop_rate=0.2),
}


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_efficient_matches_reference_in_float64(dims, case, channels_last, path):
    model = _cifar(dims, **CASES[case]).double()
    x = torch.randn(3, 2, *[SIZES[dims]] * dims, dtype=torch.float64)
    got, calls = _step(model, x, "efficient", channels_last=channels_last, count=True)
    want, _ = _step(model, x, "reference", channels_last=channels_last)
    _assert_same(want, got, 1e-10)
    assert calls.get("dense_block") == 3 and calls.get("dense_block_backward") == 3, calls
    assert calls.get("bn_relu_pool_conv" if "dropout" not in case else "bn_relu_conv") == 2, calls


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize("case", CASES)
def test_efficient_matches_reference_in_float32(dims, case, path):
    model = _cifar(dims, **CASES[case])
    x = torch.randn(3, 2, *[SIZES[dims]] * dims)
    got, _ = _step(model, x, "efficient")
    want, _ = _step(model, x, "reference")
    _assert_same(want, got, 1e-5)


@pytest.mark.parametrize("sides", [(8, 12, 4), (6, 10, 9)], ids=["windows-tile-the-volume", "odd-sides"])
def test_volume_transitions_match_reference_whether_or_not_the_pooling_windows_tile(sides, path):
    # 8x12x4 pools to 4x6x2 and 2x3x1 in 2x2x2 windows that cover every voxel (the
    # transitions pool on the rows themselves); 6x10x9 pools to 3x5x4 and 1x2x2, dropping
    # the last plane where a side is odd (PyTorch's pooling)
    model = _cifar(3, depth=16).double()
    x = torch.randn(2, 2, *sides, dtype=torch.float64)
    got, calls = _step(model, x, "efficient", count=True)
    want, _ = _step(model, x, "reference")
    _assert_same(want, got, 1e-10)
    assert calls.get("bn_relu_pool_conv") == 2 and calls.get("bn_relu_pool_conv_backward") == 2, calls


@pytest.mark.parametrize("kernel", [(2, 2, 2), (1, 2, 3)])
def test_tiled_window_mean_and_its_gradient_equal_avg_pool3d(kernel):
    from densenet.ops.bn import _tile_mean, _tile_mean_grad, _tiles
    sp = (4, 6, 6)
    assert _tiles(sp, kernel, kernel, [0, 0, 0])
    assert not _tiles((5, 6, 6), [2, 2, 2], [2, 2, 2], [0, 0, 0])  # an odd side
    assert not _tiles(sp, [2, 2, 2], [1, 1, 1], [0, 0, 0])  # overlapping windows
    assert not _tiles(sp, [2, 2, 2], [2, 2, 2], [1, 1, 1])  # padding
    z = torch.randn(2 * 4 * 6 * 6, 5, dtype=torch.float64)
    zimg = rows.nchw(z, 2, *sp)
    got = _tile_mean(z, 2, sp, kernel)
    want = F.avg_pool3d(zimg, kernel, kernel)
    assert rows.is_channels_last(got) and torch.allclose(got, want, rtol=0, atol=1e-14)
    dp = torch.randn_like(want)
    out = torch.empty_like(z)
    _tile_mean_grad(rows.to_layout(dp, True), kernel, out)
    ref = torch.ops.aten.avg_pool3d_backward(dp, zimg.contiguous(), list(kernel), list(kernel), [0, 0, 0],
                                             False, True, None)
    assert torch.allclose(rows.nchw(out, 2, *sp), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
def test_imagenet_stem_matches_reference_and_runs_the_fused_stem(dims, path):
    model = _imagenet_stem(dims).double()
    x = torch.randn(2, 1, *[16] * dims, dtype=torch.float64)
    got, calls = _step(model, x, "efficient", count=True)
    want, _ = _step(model, x, "reference")
    _assert_same(want, got, 1e-10)
    # a volume's BN-ReLU-max-pooling is one op; a signal's BN-ReLU is, its pooling the module's
    fused = "bn_relu_maxpool" if dims == 3 else "bn_relu"
    assert calls.get(fused, 0) >= 1 and calls.get(fused + "_backward", 0) >= 1, calls


def test_a_volume_block_keeps_its_bottleneck_outputs_only_while_they_are_small(monkeypatch):
    from densenet.ops import block
    x = torch.randn(2, 8, 4, 4, 4)
    layer = [torch.ones(8), torch.zeros(8), torch.randn(16, 8, 1, 1, 1),
             torch.ones(16), torch.zeros(16), torch.randn(4, 16, 3, 3, 3)]
    spec = block.BlockSpec(4, True, 1e-5, True, 0.0)
    size = 2 * 4 * 4 * 4 * 16 * 4  # one layer's 16 maps of 2 volumes of 4^3, float32
    monkeypatch.setattr(block, "KEEP_BOTTLENECK_BYTES", size - 1)
    saved = block.forward(x, layer, [], [], spec, save=True)
    assert saved.y1.numel() == 0  # past the limit nothing of 4k maps per layer is kept
    monkeypatch.setattr(block, "KEEP_BOTTLENECK_BYTES", size)
    assert block.forward(x, layer, [], [], spec, save=True).y1.shape == (1, 2 * 4 ** 3, 16)
    monkeypatch.setattr(block, "KEEP_BOTTLENECK_BYTES", 0)
    image = block.forward(x[:, :, 0], [*layer[:2], layer[2][..., 0], *layer[3:5], layer[5][:, :, 0]],
                          [], [], spec, save=True)
    assert image.y1.shape == (1, 2 * 4 * 4, 16)  # images keep them whatever their size


@pytest.mark.parametrize("case", CASES)
def test_large_volume_paths_match_reference_in_float64(case, monkeypatch, path):
    # the small test volumes take the small-volume paths (bottleneck outputs kept, contiguous
    # convolution backward); with both limits at 0 they take the large-volume ones
    from densenet.ops import block
    monkeypatch.setattr(block, "KEEP_BOTTLENECK_BYTES", 0)
    monkeypatch.setattr(block, "CONTIGUOUS_CONV_POSITIONS", 0)
    model = _cifar(3, **CASES[case]).double()
    x = torch.randn(3, 2, *[SIZES[3]] * 3, dtype=torch.float64)
    got, calls = _step(model, x, "efficient", count=True)
    want, _ = _step(model, x, "reference")
    _assert_same(want, got, 1e-10)
    assert calls.get("dense_block_backward") == 3, calls


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
def test_running_statistics_are_updated_once_per_step(dims):
    model = _cifar(dims).train()
    ref = copy.deepcopy(model).set_implementation("reference")
    x = torch.randn(3, 2, *[SIZES[dims]] * dims)
    model(x).sum().backward()
    ref(x).sum().backward()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.num_batches_tracked.item() == 1 for m in norms)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_runs_the_ops_on_volumes_and_is_close():
    model = _cifar(3)
    x = torch.randn(2, 2, 8, 8, 8)
    ref = model(x)
    mode = _OpCalls()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert mode.calls.get("dense_block") == 3 and mode.calls.get("dense_block_backward") == 3
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_torch_compile_trains_a_volume_model_without_graph_breaks():
    torch._dynamo.reset()
    model = _imagenet_stem(3).train()
    ref = copy.deepcopy(model).set_implementation("reference")
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.tensor([0, 2])
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    code = "\n".join(g.code for g in explanation.graphs)
    assert code.count("torch.ops.densenet.dense_block") == 2
    assert "torch.ops.densenet.bn_relu_maxpool" in code
    compiled = torch.compile(model)
    F.cross_entropy(compiled(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_torch_export_captures_a_volume_model_with_the_ops():
    model = _imagenet_stem(3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 16, 16, 16)
    program = torch.export.export(model, (x,))
    code = program.graph_module.code
    assert code.count("torch.ops.densenet.dense_block.default") == 2
    with torch.no_grad():
        got = program.module()(x)
        want = copy.deepcopy(model).set_implementation("reference")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
def test_the_engine_matches_the_plain_modules_on_the_device(device, dims):
    """The CPU twin and, on a GPU, the CUDA one (Triton kernels on the same row matrices):
    float64 to 1e-10 for a CIFAR-shaped net, the ImageNet stem's fused 3-D pooling included."""
    for model in (_cifar(dims, drop_rate=0.2), _imagenet_stem(dims)):
        model = model.double().to(device)
        x = torch.randn(2, model.in_channels, *[16] * dims, dtype=torch.float64, device=device)
        got, calls = _step(model, x, "efficient", count=True)
        want, _ = _step(model, x, "reference")
        _assert_same(want, got, 1e-10)
        assert calls.get("dense_block") and calls.get("dense_block_backward"), calls
