"""Run by test_gpu_kernels.py in a process of its own: the Triton kernels under Triton's
interpreter (on CPU tensors), against float64 formulas, then whole training steps of small
DenseNets through them against the plain modules (float32) and against the float32 step (bf16
autocast). Prints one JSON object."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles anything

import copy  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from densenet import backends, densenet_cifar  # noqa: E402
from densenet.ops import cuda as gpu_kernels, elementwise  # noqa: E402


def rel(got, ref):
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def kernel_errors(dtype):
    torch.manual_seed(0)
    m, c, ld = 150, 37, 50  # 3 row blocks, 2 channel blocks, both ragged; strided rows
    cols = lambda: torch.randn(m, ld)[:, :c].to(dtype)  # noqa: E731
    x, g, src = cols(), cols(), cols()
    scale, shift, mean, a, b = (torch.randn(c) for _ in range(5))
    xd, gd = x.double(), g.double()
    pre = xd * scale.double() + shift.double()
    gp = torch.where(pre > 0, gd, 0)
    out = {}
    y = gpu_kernels.bn_relu(x, scale, shift, cols())
    out["bn_relu"] = rel(y, pre.relu())
    for variant in ("sums", "dx", "dx assign", "dx z"):
        gg, dx, z = g.clone(), cols(), cols()
        sums = gpu_kernels.bn_relu_grad(
            x, gg, scale, shift, mean, dx=None if variant == "sums" else dx,
            z=z if "z" in variant else None, assign="assign" in variant)
        out[f"bn_relu_grad {variant}: g'"] = rel(gg, gp)
        out[f"bn_relu_grad {variant}: sum g'"] = rel(sums[0], gp.sum(0))
        out[f"bn_relu_grad {variant}: sum (x - mean) g'"] = rel(sums[1], ((xd - mean.double()) * gp).sum(0))
        if "z" in variant:
            out[f"bn_relu_grad {variant}: z"] = rel(z, pre.relu())
    # dx += g' * scale and dx = g' * scale, on a copy kept for the expectation
    dx0 = cols()
    dx = dx0.clone()
    gpu_kernels.bn_relu_grad(x, g.clone(), scale, shift, mean, dx=dx)
    out["bn_relu_grad: dx += g' * scale"] = rel(dx, dx0.double() + gp * scale.double())
    dx = dx0.clone()
    gpu_kernels.bn_relu_grad(x, g.clone(), scale, shift, mean, dx=dx, assign=True)
    out["bn_relu_grad: dx = g' * scale"] = rel(dx, gp * scale.double())
    o = gpu_kernels.bn_grad_apply(x, g, scale, shift, mean, a, b, cols())
    out["bn_grad_apply"] = rel(o, scale.double() * (gp - a.double() - (xd - mean.double()) * b.double()))
    o = gpu_kernels.col_affine_add(x, a, b, src, cols())
    out["col_affine_add"] = rel(o, src.double() + xd * a.double() + b.double())
    return out


def errors():
    x = torch.randn(8, 4)
    cases = {
        "out shape": lambda: gpu_kernels.bn_relu(x, torch.ones(4), torch.ones(4), torch.empty(8, 5)),
        "scale length": lambda: gpu_kernels.bn_relu(x, torch.ones(3), torch.ones(4), torch.empty(8, 4)),
        "dtype": lambda: gpu_kernels.bn_relu(x.double(), torch.ones(4), torch.ones(4), torch.empty(8, 4)),
        "g dtype": lambda: gpu_kernels.bn_relu_grad(x, x.bfloat16(), torch.ones(4), torch.ones(4), torch.ones(4)),
        "overlapping rows": lambda: gpu_kernels.col_affine_add(
            x, torch.ones(4), torch.ones(4), x, torch.empty(8, 4).as_strided((8, 4), (2, 1))),
        "column stride": lambda: gpu_kernels.bn_grad_apply(
            x, x, *(torch.ones(4),) * 5, torch.empty(4, 8).t()),
        "sums shape": lambda: gpu_kernels.bn_relu_grad(x, x.clone(), torch.ones(4), torch.ones(4),
                                                       torch.ones(4), sums=torch.zeros(2, 3)),
        "meta tensor": lambda: gpu_kernels.bn_relu(x.to("meta"), torch.ones(4), torch.ones(4), x),
    }
    said = {}
    for what, call in cases.items():
        try:
            call()
            said[what] = None
        except ValueError as e:
            said[what] = str(e)
    return said


CALLS = {}
for _name in ("bn_relu", "bn_relu_grad", "bn_grad_apply", "col_affine_add"):
    def _counted(*args, _fn=getattr(gpu_kernels, _name), _name=_name, **kwargs):
        CALLS[_name] = CALLS.get(_name, 0) + 1
        return _fn(*args, **kwargs)
    setattr(gpu_kernels, _name, _counted)
# CPU tensors get the Triton kernels (interpreted) where CUDA tensors would: registered for the
# CPU dispatch key in place of the C kernels; densenet.backends.triton off gives the torch ops
elementwise.register_kernels("CPU", *elementwise._cuda_kernels())


def _step(model, x, how, bf16):
    """One training step on a copy of ``model``: "reference" (plain modules), "torch ops" (the
    efficient block without kernels) or "triton" (the efficient block through the kernels)."""
    backends.triton = how == "triton"
    net = copy.deepcopy(model).set_implementation("reference" if how == "reference" else "efficient")
    net.train()
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = net(xi).float()
    (y * torch.linspace(-1, 1, y.shape[1])).square().sum().backward()
    return dict(out=y.detach(), dx=xi.grad,
                **{"grad:" + k: p.grad for k, p in net.named_parameters()},
                **{"buffer:" + k: v for k, v in net.state_dict().items() if v.is_floating_point()})


def block_step(case):
    """One float32 training step of a small DenseNet through the Triton kernels (interpreted)
    and the same through the plain modules: worst relative difference over outputs, gradients
    and buffers, and how often each kernel ran."""
    torch.manual_seed(0)
    model = densenet_cifar(**case)
    x = torch.randn(3, 3, 8, 8)
    ref = _step(model, x, "reference", False)
    CALLS.clear()
    got = _step(model, x, "triton", False)
    grad_scale = max(v.abs().max().item() for k, v in ref.items() if k.startswith("grad:"))
    worst = 0.0
    for k in ref:
        floor = 1e-4 * grad_scale if k.startswith("grad:") else 1e-30
        d = ((got[k].double() - ref[k].double()).abs().max()
             / ref[k].double().abs().max().clamp_min(floor)).item()
        worst = max(worst, d)
    return {"worst_rel": worst, "calls": dict(CALLS)}


def bf16_step(case):
    """The same step under bf16 autocast: the global normwise error of the input and parameter
    gradients against the float32 step, for the plain modules, the efficient block's torch ops
    and its Triton kernels (per-tensor differences of a tiny bf16 net are all large)."""
    torch.manual_seed(0)
    model = densenet_cifar(**case)
    x = torch.randn(4, 3, 8, 8)
    exact = _step(model, x, "reference", False)
    keys = [k for k in exact if k == "dx" or k.startswith("grad:")]
    flat = lambda r: torch.cat([r[k].double().flatten() for k in keys])  # noqa: E731
    out = {}
    for how in ("reference", "torch ops", "triton"):
        CALLS.clear()
        r = _step(model, x, how, True)
        out[how] = ((flat(r) - flat(exact)).norm() / flat(exact).norm()).item()
        if how == "triton":
            out["calls"] = dict(CALLS)
        elif how == "torch ops":  # densenet.backends.triton = False: none of the kernels ran
            out["calls with triton off"] = dict(CALLS)
    return out


if __name__ == "__main__":
    print(json.dumps({
        "kernels": {str(d).removeprefix("torch."): kernel_errors(d) for d in (torch.float32, torch.bfloat16)},
        "errors": errors(),
        "block": {"DenseNet-BC": block_step(dict(depth=16, growth_rate=4, bottleneck=True)),
                  "basic DenseNet": block_step(dict(depth=13, growth_rate=4, bottleneck=False,
                                                    compression=1.0)),
                  "DenseNet-BC with dropout": block_step(dict(depth=16, growth_rate=4,
                                                              bottleneck=True, drop_rate=0.2))},
        "bf16": bf16_step(dict(depth=16, growth_rate=4, bottleneck=True)),
    }))
