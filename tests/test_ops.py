"""The efficient block as registered ``densenet::`` ops: it keeps running (and matching the plain
modules) under bf16 autocast, ``torch.compile`` and ``torch.export``. Every test counts the
calls of the op's forward and backward implementations, so a silent fallback to the plain
modules fails it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from densenet import densenet_cifar
from densenet.ops import block


@pytest.fixture
def calls(monkeypatch):
    """How often the block op's forward and backward computations ran."""
    counts = {"forward": 0, "backward": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(block, "forward", counted(block.forward, "forward"))
    monkeypatch.setattr(block, "backward", counted(block.backward, "backward"))
    return counts


def _model(**kw):
    torch.manual_seed(0)
    return densenet_cifar(16, growth_rate=4, **kw)  # 3 blocks of 2 bottleneck layers


def _train_step(model, x, y, call=None):
    """One forward and backward (through ``call``, the model itself by default): the loss, the
    gradients and the BN buffers it leaves."""
    loss = F.cross_entropy((model if call is None else call)(x), y)
    loss.backward()
    return dict(loss=loss.detach().float(),
                **{"grad:" + k: p.grad.float() for k, p in model.named_parameters()},
                **{"buffer:" + k: b for k, b in model.named_buffers()})


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _batch(n=8, size=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_the_ops_are_registered_with_torch():
    for name in ("dense_block", "dense_block_backward", "bn_relu", "bn_relu_maxpool",
                 "bn_relu_conv", "bn_relu_pool_conv"):
        assert hasattr(torch.ops.densenet, name), name
    x = torch.randn(2, 8, 4, 4)
    params = [torch.ones(8), torch.zeros(8), torch.randn(16, 8, 1, 1),
              torch.ones(16), torch.zeros(16), torch.randn(4, 16, 3, 3)]
    # the fake (meta) implementation gives the real one's shapes and dtypes
    real = torch.ops.densenet.dense_block(x, params, [], [], 4, True, 1e-5, True, 0.0, True)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.densenet.dense_block(mode.from_tensor(x), [mode.from_tensor(p) for p in params],
                                              [], [], 4, True, 1e-5, True, 0.0, True)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert real[0].shape == (2, 4, 4, 12) and real[2].shape == (2, 12) and real[3].shape == (1, 2, 16)


def test_a_wrong_argument_to_the_op_is_refused():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"params must hold 6 tensors per layer, got 5"):
        torch.ops.densenet.dense_block(x, [torch.ones(8)] * 5, [], [], 4, True, 1e-5, True, 0.0, False)
    with pytest.raises(ValueError, match=r"first layer's norm weight has \(7,\) elements, the input 8"):
        torch.ops.densenet.dense_block(x, [torch.ones(7), torch.zeros(7), torch.randn(4, 7, 3, 3)], [], [],
                                       4, False, 1e-5, True, 0.0, False)


def _flat_grads(step):
    return torch.cat([v.double().flatten() for k, v in step.items() if k.startswith("grad:")])


@pytest.mark.parametrize("drop_rate", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_bf16_autocast_runs_the_op_and_matches_the_reference(calls, drop_rate):
    """Under bf16 the efficient path is as close to the float32 result as PyTorch's own bf16
    modules are (a random net's gradients at initialisation differ from float32 by 5-20% under
    bf16 on either path), and its running statistics stay float32, updated once."""
    model = _model(drop_rate=drop_rate).train()
    ref = copy.deepcopy(model).set_implementation("reference")
    f32 = copy.deepcopy(ref)
    x, y = _batch(8, 16)
    steps = {}
    for name, net, amp in (("f32", f32, False), ("ref", ref, True), ("ours", model, True)):
        torch.manual_seed(5)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            steps[name] = _train_step(net, x, y)
    assert calls == {"forward": 3, "backward": 3}
    assert steps["ours"].keys() == steps["ref"].keys()
    assert _rel(steps["ours"]["loss"], steps["f32"]["loss"]) < 1e-2
    g = {name: _flat_grads(step) for name, step in steps.items()}
    err = {name: ((g[name] - g["f32"]).norm() / g["f32"].norm()).item() for name in ("ref", "ours")}
    assert err["ours"] < 1.5 * err["ref"] + 0.02, err
    assert ((g["ours"] - g["ref"]).norm() / g["ref"].norm()).item() < 0.15
    for name, bn in model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            ref_bn = ref.get_submodule(name)
            assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32, name
            assert bn.num_batches_tracked.item() == 1, name  # updated exactly once
            # momentum 0.1 of the batch statistics of bf16 maps, accumulated in float32
            for buf in ("running_mean", "running_var"):
                a, b = getattr(bn, buf), getattr(ref_bn, buf)
                assert (a - b).abs().max().item() < 2e-3 * max(1.0, b.abs().max().item()), (name, buf)


def test_bf16_autocast_keeps_batch_statistics_in_float32(calls):
    """The first layer's BN reads the stem's output, the same bf16 tensor on both paths: its
    statistics (float32 from bf16 maps) agree to float32 rounding."""
    model = _model().train()
    ref = copy.deepcopy(model).set_implementation("reference")
    x, y = _batch()
    for net in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16
    assert calls["forward"] == 3
    a, b = model.features.denseblock1.denselayer1.norm1, ref.features.denseblock1.denselayer1.norm1
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_casts_the_buffer_but_not_the_norm_parameters(calls):
    model = _model().train()
    x, _ = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.features.denseblock1(model.features.conv0(x))
    assert feats.dtype == torch.bfloat16 and calls["forward"] == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_torch_compile_trains_with_the_op_without_graph_breaks(calls):
    torch._dynamo.reset()
    model = _model().train()
    ref = copy.deepcopy(model).set_implementation("reference")
    x, y = _batch()
    explanation = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    code = "\n".join(g.code for g in explanation.graphs)
    assert code.count("torch.ops.densenet.dense_block") == 3  # one per block, traced as the op
    for key in calls:
        calls[key] = 0
    compiled = torch.compile(model)
    got, want = _train_step(model, x, y, call=compiled), _train_step(ref, x, y)
    assert calls == {"forward": 3, "backward": 3}
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-5, atol=1e-5, msg=key)
    torch._dynamo.reset()


def test_torch_export_captures_the_default_model_with_the_op(calls):
    model = _model().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x, _ = _batch(4)
    program = torch.export.export(model, (x,))
    code = program.graph_module.code
    assert code.count("torch.ops.densenet.dense_block.default") == 3
    for key in calls:
        calls[key] = 0
    with torch.no_grad():
        got = program.module()(x)
        want = copy.deepcopy(model).set_implementation("reference")(x)
    assert calls["forward"] == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
