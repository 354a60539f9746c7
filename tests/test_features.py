"""The backbone (``features_only``, timm's conventions), ``forward_intermediates`` and hooks: the
feature maps, their description, checkpoint loading, the efficient path's equality with the
plain modules, and hooks firing on every module."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from densenet import DenseNet, DenseNetFeatures, UsageError, create_model, densenet_cifar
from densenet.ops import block, modules


def _cifar(**kw):
    torch.manual_seed(0)
    return densenet_cifar(16, growth_rate=4, **kw)  # 3 blocks of 2 bottleneck layers


def _imagenet(**kw):
    torch.manual_seed(0)  # the ImageNet stem and 3 small blocks: 4 maps
    return DenseNet(growth_rate=4, block_config=(2, 3, 2), num_init_features=8, num_classes=5, **kw)


def _images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def _assert_close(got, want, msg=None, tol=1e-5):
    """Equal within ``tol`` of the tensor's scale: gradients reach a few hundred, and float32
    sums in another order differ by ~1e-7 of that."""
    scale = want.abs().max().item() if want.is_floating_point() and want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1.0), msg=msg)


@pytest.fixture
def op_calls(monkeypatch):
    """Calls of the block op's and the BN-ReLU op's forwards (a fallback to the modules runs
    neither): ``op_calls["block"].call_count``."""
    mocks = {"block": mock.Mock(wraps=block.forward),
             "bn_relu": mock.Mock(wraps=modules.bn_relu_forward)}
    monkeypatch.setattr(block, "forward", mocks["block"])
    monkeypatch.setattr(modules, "bn_relu_forward", mocks["bn_relu"])
    return mocks


# ----------------------------------------------------------------------------- maps and their description

def test_densenet121_backbone_has_five_maps_at_strides_2_to_32():
    model = create_model("densenet121", features_only=True).eval()
    assert isinstance(model, DenseNetFeatures)
    info = model.feature_info
    assert info.channels() == [64, 256, 512, 1024, 1024]
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert info.module_name() == ["features.norm0", "features.denseblock1", "features.denseblock2",
                                  "features.denseblock3", "features.norm5"]
    assert len(info) == 5 and [d["index"] for d in info] == [0, 1, 2, 3, 4]
    assert info[-1] == {"num_chs": 1024, "reduction": 32, "module": "features.norm5", "index": 4}
    x = _images(2, 64)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // r, 64 // r) for c, r in
                                             zip(info.channels(), info.reduction())]


def test_cifar_backbone_has_the_three_blocks_outputs():
    model = create_model("densenet_bc100_k12", features_only=True).eval()
    info = model.feature_info
    assert info.channels() == [216, 300, 342]
    assert info.reduction() == [1, 2, 4]
    assert info.module_name() == ["features.denseblock1", "features.denseblock2", "features.norm5"]
    with torch.no_grad():
        maps = model(_images(2, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 216, 32, 32), (2, 300, 16, 16), (2, 342, 8, 8)]


def test_the_classifier_describes_all_its_maps():
    model = create_model("densenet121")
    assert model.feature_info.channels() == [64, 256, 512, 1024, 1024]
    assert model.feature_info[-1]["num_chs"] == model.num_features
    assert [d["module"] for d in model.feature_info] == model.feature_info.module_name()
    assert create_model("densenet161").feature_info.channels() == [96, 384, 768, 2112, 2208]
    # the names are modules of the model
    names = dict(model.named_modules())
    assert all(name in names for name in model.feature_info.module_name())


def test_the_description_matches_the_maps_of_every_registered_family():
    for model in (_cifar().eval(), _imagenet().eval()):
        with torch.no_grad():
            maps = model.forward_intermediates(_images(1, 32), intermediates_only=True)
        assert [m.shape[1] for m in maps] == model.feature_info.channels()
        assert [32 // m.shape[-1] for m in maps] == model.feature_info.reduction()


# ----------------------------------------------------------------------------- selecting maps

def test_out_indices_select_maps_in_forward_order():
    classifier = _randomize_bn(_imagenet()).eval()  # 4 maps
    full = DenseNetFeatures(classifier)
    x = _images(2, 32)
    with torch.no_grad():
        everything = full(x)
    for out_indices, expected in [((1, 3), [1, 3]), ((-1, 0), [0, 3]), ([2], [2]), (2, [2, 3])]:
        model = DenseNetFeatures(classifier, out_indices)
        assert model.out_indices == tuple(expected)
        assert model.feature_info.channels() == [full.feature_info.channels()[i] for i in expected]
        assert [d["index"] for d in model.feature_info] == expected
        with torch.no_grad():
            maps = model(x)
        assert len(maps) == len(expected)
        for got, i in zip(maps, expected):
            torch.testing.assert_close(got, everything[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_indices,message", [
    ((0, 4), "index 4 is out of range for the model's 4 feature maps; valid indices are 0 to 3, or -4 to -1"),
    ((-5,), "index -5 is out of range"),
    ((1, -3), "selects feature map 1 twice; give each index once"),
    ((), "is empty; select at least one of the model's 4 feature maps"),
    (5, "asks for the last 5 feature maps but the model has 4; give a count from 1 to 4"),
    (0, "give a count from 1 to 4"),
    (("1",), "must be None, a count or a sequence of integer indices"),
    ((True,), "must be None, a count or a sequence of integer indices"),
])
def test_wrong_out_indices_are_refused_with_the_valid_range(out_indices, message):
    with pytest.raises(UsageError, match="out_indices") as e:
        DenseNetFeatures(_imagenet(), out_indices=out_indices)
    assert message in str(e.value)


def test_out_indices_of_create_model_select_the_same_way():
    model = create_model("densenet121", features_only=True, out_indices=(-2, 1))
    assert model.out_indices == (1, 3) and model.feature_info.channels() == [256, 1024]
    assert model.feature_info.module_name() == ["features.denseblock1", "features.denseblock3"]


def test_out_indices_need_features_only_and_indices_are_checked_the_same_way():
    with pytest.raises(UsageError, match="pass features_only=True"):
        create_model("densenet_bc100_k12", out_indices=(0,))
    with pytest.raises(UsageError, match="out_indices \\(0, 5\\): index 5 is out of range .* 0 to 4"):
        create_model("densenet121", features_only=True, out_indices=(0, 5))
    with pytest.raises(UsageError, match="indices \\(3,\\): index 3 is out of range .* 0 to 2"):
        _cifar().forward_intermediates(_images(), indices=(3,))
    with pytest.raises(UsageError, match="wraps a model of the registry"):
        DenseNetFeatures(nn.Linear(2, 2))


def test_nothing_after_the_last_selected_map_runs(op_calls):
    model = DenseNetFeatures(_cifar().train(), out_indices=(0,))
    ran = []
    for name, child in model.features.named_children():
        child.register_forward_pre_hook(lambda mod, inp, name=name: ran.append(name))
    maps = model(_images(2, 16))
    assert len(maps) == 1 and maps[0].shape[1] == model.feature_info.channels()[0]
    assert ran == ["conv0", "denseblock1"]
    assert op_calls["block"].call_count == 1 and op_calls["bn_relu"].call_count == 0


# ----------------------------------------------------------------------------- forward_intermediates

@pytest.mark.parametrize("make", [_cifar, _imagenet])
def test_forward_intermediates_final_is_forward_features_and_gives_the_logits(make):
    model = _randomize_bn(make()).eval()
    x = _images(2, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(final), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(maps[-1], final, rtol=0, atol=0)
        backbone = DenseNetFeatures(model)(x)
    assert len(maps) == len(only) == len(backbone) == len(model.feature_info)
    for a, b, c in zip(maps, only, backbone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    # a selection still gives the final features
    with torch.no_grad():
        final1, maps1 = model.forward_intermediates(x, indices=[0])
    torch.testing.assert_close(final1, final, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps1[0], maps[0], rtol=1e-5, atol=1e-5)


def _taps_step(model, x, weights):
    """Maps, gradients (input and parameters) and buffers after one backward of a weighted sum
    of all maps."""
    x = x.clone().requires_grad_(True)
    maps = model.forward_intermediates(x, intermediates_only=True)
    sum(m.mul(w).sum() for m, w in zip(maps, weights)).backward()
    return {**{f"map{i}": m.detach() for i, m in enumerate(maps)}, "grad:x": x.grad,
            **{"grad:" + k: p.grad for k, p in model.named_parameters() if p.grad is not None},
            **{"buffer:" + k: b for k, b in model.named_buffers()}}


@pytest.mark.parametrize("make,size", [(_cifar, 16), (_imagenet, 32)])
@pytest.mark.parametrize("train", [True, False])
def test_the_efficient_maps_and_gradients_equal_the_plain_modules(make, size, train, op_calls):
    model = _randomize_bn(make()).train(train)
    ref = copy.deepcopy(model).set_implementation("reference")
    x = _images(2, size)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        shapes = [m.shape for m in ref.forward_intermediates(x, intermediates_only=True)]
    if train:  # the shape probe above updated the running statistics of ref only
        ref.load_state_dict(model.state_dict())
    weights = [torch.randn(s, generator=g) for s in shapes]
    got, want = _taps_step(model, x, weights), _taps_step(ref, x, weights)
    assert op_calls["block"].call_count == len(model.block_config)
    assert op_calls["bn_relu"].call_count == (2 if model.stem == "imagenet" else 1)  # norm0 (tapped) and norm5
    assert got.keys() == want.keys()
    for key in got:
        _assert_close(got[key], want[key], msg=key)


def test_channels_last_input_gives_the_same_maps():
    model = _randomize_bn(_imagenet())
    x = _images(2, 32)
    for train in (True, False):
        model.train(train)
        a = copy.deepcopy(model).forward_intermediates(x, intermediates_only=True)
        b = copy.deepcopy(model).forward_intermediates(x.contiguous(memory_format=torch.channels_last),
                                                       intermediates_only=True)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_bf16_autocast_maps_are_close_to_float32(train, op_calls):
    model = DenseNetFeatures(_randomize_bn(_imagenet()).train(train))
    x = _images(2, 32)
    want = copy.deepcopy(model)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert op_calls["block"].call_count == 2 * 3  # both runs kept the op in their 3 blocks
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        rel = (g.float() - w).abs().max() / w.abs().max()
        assert rel < 5e-2, rel
    if train:
        sum(g.float().sum() for g in got).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- checkpoints

def test_a_torchvision_classifier_state_dict_loads_strictly_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    _randomize_bn(tv)
    state = tv.state_dict()
    model = create_model("densenet121", features_only=True).eval()
    result = model.load_state_dict(state)  # strict by default
    assert not result.missing_keys and not result.unexpected_keys
    assert sorted(model.state_dict()) == sorted(k for k in state if not k.startswith("classifier."))
    x = _images(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], F.relu(tv.features(x)), rtol=1e-4, atol=1e-5)
    path = tmp_path / "densenet121_tv.pth"
    torch.save(state, path)
    loaded = create_model("densenet121", weights=str(path), features_only=True, out_indices=(-1,))
    torch.testing.assert_close(loaded.features.conv0.weight, tv.features.conv0.weight)


def test_a_classifier_of_another_number_of_classes_loads_into_the_backbone(tmp_path):
    path = tmp_path / "cifar100.pth"
    torch.save(create_model("densenet_bc100_k12", num_classes=100).state_dict(), path)
    create_model("densenet_bc100_k12", weights=str(path), features_only=True)
    with pytest.raises(UsageError, match="do not fit this model"):
        create_model("densenet_bc100_k12", weights=str(path))  # the classifier must fit


def test_anything_but_the_classifier_must_still_match(tmp_path):
    model = create_model("densenet121", features_only=True)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        model.load_state_dict(torchvision.models.densenet169(weights=None).state_dict())
    state = create_model("densenet121").state_dict()
    state["features.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*features.extra.weight"):
        model.load_state_dict(state)
    del state["features.extra.weight"], state["features.norm5.weight"]
    with pytest.raises(RuntimeError, match="Missing key.*features.norm5.weight"):
        model.load_state_dict(state)
    path = tmp_path / "densenet169.pth"
    torch.save(create_model("densenet169").state_dict(), path)
    with pytest.raises(UsageError, match="do not fit this model"):
        create_model("densenet121", weights=str(path), features_only=True)


# ----------------------------------------------------------------------------- hooks

def test_no_relu_is_in_place():
    for model in (create_model("densenet121"), _cifar(), DenseNetFeatures(_imagenet())):
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert relus and all(not m.inplace for m in relus)


def _loss(model, x, y):
    # an input that needs its gradient, so conv0's backward hook has an input gradient to see
    return F.cross_entropy(model(x.detach().requires_grad_(True)), y)


@pytest.mark.parametrize("make", [_cifar, _imagenet])
@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_hooks_on_every_leaf_module_fire_and_leave_the_gradients_alone(make, implementation):
    model = _randomize_bn(make(implementation=implementation)).train()
    plain = copy.deepcopy(model)
    x = _images(4, 16)
    y = torch.arange(4) % 5
    leaves = [m for m in model.modules() if not list(m.children())]
    counts = {"forward": 0, "forward_pre": 0, "backward": 0, "backward_pre": 0}

    def count(key):
        def hook(*args):
            counts[key] += 1
        return hook

    for m in leaves:
        m.register_forward_hook(count("forward"))
        m.register_forward_pre_hook(count("forward_pre"))
        m.register_full_backward_hook(count("backward"))
        m.register_full_backward_pre_hook(count("backward_pre"))
    _loss(model, x, y).backward()
    assert counts == {key: len(leaves) for key in counts}
    _loss(plain, x, y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        _assert_close(p.grad, q.grad, msg=name)


def test_a_backward_hook_on_a_dense_layer_sees_its_input_gradient():
    for implementation in ("efficient", "reference"):
        model = _cifar(implementation=implementation)
        layer = model.features.denseblock2.denselayer2
        seen = []
        layer.register_full_backward_hook(lambda mod, gin, gout: seen.append(gin[0]))
        _loss(model, _images(2, 16), torch.tensor([0, 1])).backward()
        assert len(seen) == 1 and seen[0] is not None
        assert seen[0].shape[1] == layer.norm1.num_features  # the concatenation's gradient


def test_the_op_runs_again_once_the_hooks_are_removed(op_calls):
    model = _cifar()
    x = _images(2, 16)
    handle = model.features.denseblock2.denselayer1.norm1.register_forward_hook(lambda *a: None)
    model(x)
    assert op_calls["block"].call_count == 2  # the hooked block ran its modules
    handle.remove()
    model(x)
    assert op_calls["block"].call_count == 5


def test_hooks_on_the_stem_and_norm5_fire_on_the_efficient_path():
    model = _randomize_bn(_imagenet()).eval()
    ref = copy.deepcopy(model).set_implementation("reference")
    outputs = {}
    for m in (model, ref):
        for name in ("norm0", "relu0", "pool0", "norm5"):
            getattr(m.features, name).register_forward_hook(
                lambda mod, inp, out, key=(m.implementation, name): outputs.setdefault(key, out))
    x = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    for name in ("norm0", "relu0", "pool0", "norm5"):
        torch.testing.assert_close(outputs["efficient", name], outputs["reference", name],
                                   rtol=1e-5, atol=1e-5, msg=name)


def test_a_hook_on_the_features_container_fires():
    model = _cifar().eval()
    seen = []
    model.features.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        model(_images(2, 16))
    assert seen == [(2, model.num_features, 4, 4)]


def test_global_module_hooks_fire_on_every_module_of_both_implementations():
    model = _cifar()
    ref = copy.deepcopy(model).set_implementation("reference")
    x = _images(2, 16)
    calls = []
    handles = [nn.modules.module.register_module_forward_hook(lambda mod, inp, out: calls.append(mod)),
               nn.modules.module.register_module_full_backward_hook(lambda mod, gin, gout: calls.append(mod))]
    try:
        _loss(model, x, torch.tensor([0, 1])).backward()
        efficient_calls, calls[:] = list(calls), []
        _loss(ref, x, torch.tensor([0, 1])).backward()
    finally:
        for h in handles:
            h.remove()
    assert len(efficient_calls) == len(calls) == 2 * len(list(model.modules()))


def test_pytorchs_module_trackers_keep_the_ops(op_calls):
    """FlopCounterMode's ModuleTracker registers hooks for every module only to note which one
    runs; the ops run inside their block's call, so they stay and are counted there."""
    from torch.utils.flop_counter import FlopCounterMode
    model = _cifar()
    with FlopCounterMode(display=False) as counter:
        model(_images(2, 16))
    assert op_calls["block"].call_count == 3
    assert counter.get_total_flops() > 0


def test_torch_compile_traces_the_backbone_without_graph_breaks():
    torch._dynamo.reset()
    model = DenseNetFeatures(_imagenet().train(), out_indices=(0, 2))
    explanation = torch._dynamo.explain(model)(_images(2, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    code = "\n".join(g.code for g in explanation.graphs)
    assert code.count("torch.ops.densenet.dense_block") == 2  # blocks 1 and 2; block 3 never runs
    torch._dynamo.reset()
