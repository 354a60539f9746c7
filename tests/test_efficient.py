"""The memory-efficient dense block gives what the plain (reference) one gives: forward outputs,
parameter and input gradients, and BatchNorm running statistics (Pleiss et al. 2017, arXiv 1707.06990)."""

import copy

import pytest
import torch

from densenet import create_model, densenet_cifar


def _step(model, x, implementation, seed=1, channels_last=False, train=True):
    model = copy.deepcopy(model).set_implementation(implementation).train(train)
    x = x.clone()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).square().sum().backward()
    return dict(out=out.detach(), dx=x.grad,
                **{"grad:" + k: p.grad for k, p in model.named_parameters()},
                **{"buffer:" + k: b for k, b in model.state_dict().items()})


def _assert_same(a, b, tol):
    """Relative difference per tensor under tol. A gradient that is analytically zero (e.g. the
    stem BN's weight, whose scale the next training-mode BN removes) is compared relative to
    1e-4 of the largest gradient instead of its own rounding noise."""
    assert a.keys() == b.keys()
    grad_scale = max((v.abs().max().item() for k, v in a.items() if k.startswith("grad:")), default=0)
    for key in a:
        ref, got = a[key].double(), b[key].double()
        floor = 1e-4 * grad_scale if key.startswith("grad:") else 1e-30
        scale = ref.abs().max().clamp_min(floor)
        assert ((got - ref).abs().max() / scale).item() < tol, key


@pytest.fixture(params=["kernels", "torch-ops", "small-chunks"])
def path(request, monkeypatch):
    """The three ways the efficient path runs on a CPU: the compiled kernels (default), the
    torch ops used where they are unavailable (CUDA, no compiler), and the row-chunked 1x1
    part with many chunks and a ragged last one (real runs use 4096-row chunks)."""
    from densenet import backends
    from densenet.ops import cpu as kernels, rows
    if request.param == "torch-ops":
        monkeypatch.setattr(backends, "cpu_kernels", False)
    elif request.param == "small-chunks":
        monkeypatch.setattr(rows, "chunk_rows", lambda t, m: min(m, 37))
    if request.param != "torch-ops" and not kernels.available(torch.zeros(1)):
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    return request.param


CASES = {
    "DenseNet-BC": dict(depth=16, growth_rate=4, bottleneck=True),
    "basic DenseNet": dict(depth=13, growth_rate=4, bottleneck=False, compression=1.0),
    "DenseNet-BC with dropout": dict(depth=16, growth_rate=4, bottleneck=True, drop_rate=0.2),
    "basic with dropout": dict(depth=13, growth_rate=4, bottleneck=False, drop_rate=0.2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_efficient_block_matches_reference_in_float64(case, channels_last, path):
    torch.manual_seed(0)
    model = densenet_cifar(**CASES[case]).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ref = _step(model, x, "reference", channels_last=channels_last)
    eff = _step(model, x, "efficient", channels_last=channels_last)
    _assert_same(ref, eff, 1e-10)


@pytest.mark.parametrize("case", ["DenseNet-BC", "DenseNet-BC with dropout"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_efficient_block_matches_reference_in_float32(case, channels_last, path):
    torch.manual_seed(0)
    model = densenet_cifar(**CASES[case])
    x = torch.randn(4, 3, 16, 16)
    _assert_same(_step(model, x, "reference", channels_last=channels_last),
                 _step(model, x, "efficient", channels_last=channels_last), 1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_imagenet_stem_model_matches_reference(channels_last, path):
    # the stem's norm0+relu0 and the final norm5+ReLU run as one BN-ReLU function each
    torch.manual_seed(0)
    model = create_model("densenet121", block_config=(2, 3), num_classes=7).double()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    _assert_same(_step(model, x, "reference", channels_last=channels_last),
                 _step(model, x, "efficient", channels_last=channels_last), 1e-10)


def test_backward_in_eval_mode_uses_running_statistics_like_the_reference(path):
    # fine-tuning with frozen BN: normalisation by running stats, no mean corrections
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_same(_step(model, x, "reference", train=False), _step(model, x, "efficient", train=False), 1e-10)


def test_batchnorm_running_statistics_are_updated_once_per_step():
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4).double().train()
    assert model.implementation == "efficient"
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ref = copy.deepcopy(model).set_implementation("reference")
    for m in (model, ref):
        for _ in range(2):
            m(x).sum().backward()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == 2
    _assert_same({k: v for k, v in ref.state_dict().items()},
                 {k: v for k, v in model.state_dict().items()}, 1e-10)


def test_momentum_none_cumulative_average_matches():
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    _assert_same(_step(model, x, "reference"), _step(model, x, "efficient"), 1e-10)


def _assert_inference_matches_reference(model, x):
    """Eval mode, no gradients, running statistics away from the defaults: both layouts."""
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        ref = copy.deepcopy(model).set_implementation("reference")(x)
        out = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)


def test_inference_under_no_grad_matches_reference(path):
    torch.manual_seed(0)
    _assert_inference_matches_reference(densenet_cifar(28, growth_rate=6), torch.randn(5, 3, 16, 16))


def test_the_default_implementation_is_the_efficient_one():
    assert create_model("densenet_bc100_k12").implementation == "efficient"
    assert create_model("densenet121").implementation == "efficient"


def test_the_implementation_is_chosen_at_construction_and_switching_replaces_modules():
    from densenet.model import DenseBlock, EfficientDenseBlock, EfficientTransition, Transition
    model = densenet_cifar(16, growth_rate=4, implementation="reference")
    assert {type(m) for m in model.modules()} >= {DenseBlock, Transition}
    assert not any(type(m) in (EfficientDenseBlock, EfficientTransition) for m in model.modules())
    block, layer = model.features.denseblock1, model.features.denseblock1.denselayer1
    keys = list(model.state_dict())
    params = {k: p.data_ptr() for k, p in model.named_parameters()}
    model.set_implementation("efficient")
    new_block = model.features.denseblock1
    assert type(new_block) is EfficientDenseBlock and new_block is not block  # a new module...
    assert type(block) is DenseBlock                                           # ...the old one untouched
    assert new_block.denselayer1 is layer                                      # holding the same layers
    assert type(model.features.transition1) is EfficientTransition
    assert list(model.state_dict()) == keys
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == params  # nothing copied


def test_a_hook_registered_after_the_block_ran_still_fires():
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)  # the block's plan is worked out and kept
        seen = []
        handle = model.features.denseblock2.denselayer2.conv1.register_forward_hook(
            lambda m, i, o: seen.append(o.shape))
        model(x)
        handle.remove()
        model(x)
    assert seen == [(2, 16, 4, 4)]


def test_a_layer_part_replaced_after_the_block_ran_is_seen():
    """Replacing a layer's norm with one the op does not compute (here a BatchNorm without
    affine parameters) makes the block run its modules, as it would have from the start."""
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4).double().train()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    model(x)
    layer = model.features.denseblock1.denselayer2
    layer.norm1 = torch.nn.BatchNorm2d(layer.norm1.num_features, affine=False).double()
    ref = copy.deepcopy(model).set_implementation("reference")
    torch.manual_seed(3)
    got = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, ref(x), rtol=1e-10, atol=1e-10)


def test_each_parameter_gets_its_gradient_once_per_backward():
    # DDP's reducer fails with "marked ready twice" otherwise
    model = densenet_cifar(16, growth_rate=4)
    counts = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert counts == {name: 1 for name, _ in model.named_parameters()}


def test_frozen_parameters_get_no_gradient():
    model = densenet_cifar(16, growth_rate=4)
    model.features.denseblock1.denselayer1.conv1.weight.requires_grad_(False)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.features.denseblock1.denselayer1.conv1.weight.grad is None
    assert model.features.denseblock1.denselayer2.conv1.weight.grad is not None


def test_bf16_autocast_runs_and_is_close():
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_switching_to_reference_is_all_export_needs():
    model = densenet_cifar(16, growth_rate=4).eval().set_implementation("reference")
    x = torch.randn(1, 3, 8, 8)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


# our weight gradients keep their parameters' exact strides (DDP's buckets warn and copy otherwise)
@pytest.mark.filterwarnings("error:Grad strides do not match bucket view strides")
def test_ddp_single_process_trains_without_errors(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = DDP(densenet_cifar(16, growth_rate=4))
        for _ in range(2):
            model(torch.randn(2, 3, 8, 8)).sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_batch_of_one_and_odd_map_sizes_match_reference(channels_last, path):
    # a batch of one makes NCHW and channels-last strides ambiguous; 9x7 maps make ragged rows
    torch.manual_seed(0)
    model = densenet_cifar(16, growth_rate=4).double()
    x = torch.randn(1, 3, 9, 7, dtype=torch.float64)
    _assert_same(_step(model, x, "reference", channels_last=channels_last),
                 _step(model, x, "efficient", channels_last=channels_last), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transition_pools_before_its_convolution_with_the_same_result(dtype, path):
    """avgpool(conv1x1(z)) == conv1x1(avgpool(z)): the efficient transition does a quarter of
    the convolution's multiply-adds and matches the plain one in output and every gradient
    (several image chunks with the small-chunks path); with dropout active it cannot commute
    and runs conv-then-pool."""
    from torch.utils.flop_counter import FlopCounterMode
    from densenet.model import EfficientTransition, Transition
    torch.manual_seed(0)
    ref = Transition(24, 12, drop_rate=0.0).to(dtype)
    ref.norm.weight.data.uniform_(0.5, 1.5)
    ref.norm.bias.data.normal_()
    eff = EfficientTransition(24, 12, drop_rate=0.0).to(dtype)
    eff.load_state_dict(ref.state_dict())
    x = torch.randn(5, 24, 8, 10, dtype=dtype).to(memory_format=torch.channels_last)
    outs, grads = [], []
    for mod in (ref, eff):
        xi = x.clone().requires_grad_()
        with FlopCounterMode(display=False) as fc:
            out = mod(xi)
        outs.append((out, fc.get_total_flops()))
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in mod.parameters()])
    (r, ref_flops), (e, eff_flops) = outs
    assert e.shape == r.shape == (5, 12, 4, 5) and e.is_contiguous(memory_format=torch.channels_last)
    assert eff_flops * 4 == ref_flops
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in zip([e] + grads[1], [r] + grads[0]):
        assert ((got - want).abs().max() / want.abs().max()).item() < tol
    for name in ("running_mean", "running_var"):
        got, want = getattr(eff.norm, name), getattr(ref.norm, name)
        assert ((got - want).abs().max() / want.abs().max()).item() < tol
    assert eff.norm.num_batches_tracked.item() == ref.norm.num_batches_tracked.item() == 1

    drop = EfficientTransition(24, 12, drop_rate=0.5).to(dtype)
    with FlopCounterMode(display=False) as fc:
        drop(x)
    assert fc.get_total_flops() == ref_flops  # dropout between conv and pool: conv first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_stem_bn_relu_maxpool_matches_the_modules(dtype, channels_last, train, path):
    """The ImageNet stem's BN-ReLU-max-pooling as one function: same output, input and
    parameter gradients and running statistics as the three modules; only its input is kept
    for backward (the modules keep the BN-ReLU output and int64 pooling indices as well)."""
    import torch.nn as nn
    from densenet import ops
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)).to(dtype).train(train)
    ref[0].weight.data.uniform_(0.5, 1.5)
    ref[0].bias.data.normal_()
    ref[0].running_var.fill_(2.0)
    norm, pool = copy.deepcopy(ref[0]), ref[2]
    x = torch.randn(3, 6, 15, 13, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    outs = []
    for fused in (False, True):
        xi = x.clone().requires_grad_()
        if fused:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                saved = []
                out = ops.bn_relu_maxpool_forward(norm, pool, xi)
            # x, BN's parameters and statistics: nothing of the BN-ReLU output or the indices
            assert [t.shape for t in saved] == [(3, 6, 15, 13), (6,), (6,)] + (
                [(2, 6)] if train else [(0,), (6,), (6,)])
        else:
            out = ref(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        bn = norm if fused else ref[0]
        outs.append([out, xi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var])
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in zip(outs[1], outs[0]):
        assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item() < tol
    assert norm.num_batches_tracked.item() == ref[0].num_batches_tracked.item() == int(train)


def test_stem_pooling_the_fused_kernel_does_not_cover_runs_the_modules():
    import torch.nn as nn
    from densenet.ops.modules import maxpool_fusable
    x = torch.randn(2, 4, 9, 9)
    assert maxpool_fusable(nn.MaxPool2d(3, 2, 1), x)
    for pool in (nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, dilation=2),
                 nn.MaxPool2d(3, 2, 1, return_indices=True), nn.AvgPool2d(3, 2, 1),
                 nn.MaxPool2d(3, 0, 1), nn.MaxPool2d(3, 2, 2), nn.MaxPool2d(13, 1, 1)):
        assert not maxpool_fusable(pool, x)
    torch.manual_seed(0)
    model = create_model("densenet121", block_config=(2, 3), num_classes=7).double()
    model.features.pool0 = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    x = torch.randn(2, 3, 41, 41, dtype=torch.float64)
    _assert_same(_step(model, x, "reference"), _step(model, x, "efficient"), 1e-10)


def test_imagenet_stem_model_inference_under_no_grad_matches_reference(path):
    torch.manual_seed(0)  # the fused stem without autograd; odd map sizes
    _assert_inference_matches_reference(create_model("densenet121", block_config=(2, 3), num_classes=7),
                                        torch.randn(3, 3, 45, 38))
