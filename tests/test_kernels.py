"""The compiled CPU kernels (densenet/kernels.py) against the torch ops they replace."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from densenet import kernels

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None,
                              reason="no C compiler on this machine: the kernels cannot be built")

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _matrix(m, c, ld, dtype, offset=0.0):
    """An (m, c) column slice of an (m, ld) row-major buffer, like a block buffer's prefix."""
    return (torch.randn(m, ld, dtype=dtype) + offset)[:, :c]


def _close(got, want, dtype):
    scale = want.abs().max().clamp_min(1e-30)
    assert ((got - want).abs().max() / scale).item() < TOL[dtype]


@needs_cc
def test_kernels_are_built_and_loaded_here():
    assert kernels.available(torch.zeros(1)), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None
    assert not kernels.available(torch.zeros(1, dtype=torch.float16))  # only float32/float64


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c,ld", [(1, 1, 1), (257, 13, 40), (1000, 48, 48), (3001, 70, 133)])
def test_bn_relu_and_its_gradient_match_torch(dtype, m, c, ld):
    torch.manual_seed(m)
    x = _matrix(m, c, ld, dtype)
    g = _matrix(m, c, c + 3, dtype)
    scale, shift, mean = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    pre = x * scale + shift
    z = torch.empty(m, c, dtype=dtype)
    kernels.bn_relu(x, scale, shift, z)
    _close(z, pre.relu(), dtype)

    gm = g * (pre > 0)
    dx_buf = torch.randn(m, ld + 2, dtype=dtype)
    dx_before = dx_buf.clone()
    z2 = torch.full((m, c), float("nan"), dtype=dtype)
    sums = torch.ones(2, c, dtype=torch.float64)  # accumulated into
    kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx_buf[:, 1:c + 1], sums=sums, z=z2)
    _close(sums[0] - 1, gm.sum(0).double(), dtype)
    _close(sums[1] - 1, ((x - mean) * gm).sum(0).double(), dtype)
    _close(dx_buf[:, 1:c + 1], dx_before[:, 1:c + 1] + gm * scale, dtype)
    assert torch.equal(dx_buf[:, 0], dx_before[:, 0]) and torch.equal(dx_buf[:, c + 1:], dx_before[:, c + 1:])
    _close(z2, pre.relu(), dtype)
    kernels.bn_relu_grad(x, g, scale, shift, mean, dx=dx_buf[:, 1:c + 1], assign=True)  # dx = g' * scale
    _close(dx_buf[:, 1:c + 1], gm * scale, dtype)

    a, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    out = g.clone()
    kernels.bn_grad_apply(x, out, scale, shift, mean, a, b, out)  # in place
    _close(out, scale * (gm - a - (x - mean) * b), dtype)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,c,k,s,p", [(2, 9, 7, 5, 3, 2, 1), (3, 12, 12, 16, 3, 2, 1),
                                           (1, 5, 6, 3, 2, 2, 0), (2, 8, 8, 4, 3, 1, 1)])
def test_bn_relu_maxpool_and_its_gradient_match_torch(dtype, n, h, w, c, k, s, p):
    torch.manual_seed(n * h * w)
    x = torch.randn(n, h, w, c, dtype=dtype)
    x[0, :3, :3, 0] = 0.7  # a window of equal positive values: the first one gets the gradient
    x[-1, :, :, -1] = -5.0  # a channel that ReLU zeroes: ties at zero, no gradient
    scale, shift, mean = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    xt = x.permute(0, 3, 1, 2)
    pre = (xt * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
    want = torch.nn.functional.max_pool2d(pre.relu(), k, s, p)
    gout = torch.randn_like(want)
    (want * gout).sum().backward()
    gm = pre.grad.permute(0, 2, 3, 1)  # g' at BN's output, as torch routes and masks it
    out = torch.full((n,) + want.shape[2:] + (c,), float("nan"), dtype=dtype)
    kernels.bn_relu_maxpool(x, scale, shift, (k, k), (s, s), (p, p), out)
    assert torch.equal(out, want.detach().permute(0, 2, 3, 1))
    dx = torch.full_like(x, float("nan"))  # every element written
    sums = torch.ones(2, c, dtype=torch.float64)  # accumulated into
    kernels.bn_relu_maxpool_grad(x, scale, shift, mean, (k, k), (s, s), (p, p),
                                 gout.permute(0, 2, 3, 1).contiguous(), dx, sums)
    assert torch.equal(dx, gm)
    _close(sums[0] - 1, gm.sum((0, 1, 2)).double(), dtype)
    _close(sums[1] - 1, ((x - mean) * gm).sum((0, 1, 2)).double(), dtype)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.bn_relu_maxpool(xt, scale, shift, (k, k), (s, s), (p, p), out)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c,ld", [(1, 3, 3), (255, 5, 9), (257, 12, 216), (5000, 64, 64)])
def test_column_statistics_are_exact_even_far_from_zero(dtype, m, c, ld):
    # one pass over memory, yet no E[x^2] - E[x]^2 cancellation: data around 1e4 with unit spread
    torch.manual_seed(m)
    x = _matrix(m, c, ld, dtype, offset=1e4)
    mean, var = kernels.col_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=0, unbiased=False)
    _close(mean.double(), ref_mean, dtype)
    # float64: the data (1e4 +- 1) carry a condition number of 1e8, so agreement is 1e-12 at best
    assert ((var.double() - ref_var).abs() / ref_var.clamp_min(1e-30)).max().item() < max(TOL[dtype], 1e-10)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_affine_add_in_place_and_into_another_buffer(dtype):
    torch.manual_seed(0)
    x, src = _matrix(300, 12, 30, dtype), _matrix(300, 12, 20, dtype)
    coef, const = torch.randn(12, dtype=dtype), torch.randn(12, dtype=dtype)
    want = src + x * coef + const
    out = torch.empty(300, 12, dtype=dtype)
    kernels.col_affine_add(x, coef, const, src, out)
    _close(out, want, dtype)
    kernels.col_affine_add(x, coef, const, src, src)
    _close(src, want, dtype)


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_cols_into_a_column_slice(dtype):
    src, buf = torch.randn(301, 12, dtype=dtype), torch.zeros(301, 40, dtype=dtype)
    kernels.copy_cols(src, buf[:, 24:36])
    assert torch.equal(buf[:, 24:36], src) and not buf[:, :24].any() and not buf[:, 36:].any()


@needs_cc
def test_kernel_matrices_must_have_unit_column_stride():
    x = torch.randn(10, 8).t()
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.bn_relu(x, torch.ones(10), torch.zeros(10), torch.empty(8, 10))


def test_huge_empty_gives_a_usable_tensor_of_the_asked_shape():
    like = torch.zeros(1, dtype=torch.float64)
    for shape in [(3, 4), (64, 32, 32, 216)]:
        t = kernels.huge_empty(shape, like)
        assert t.shape == shape and t.dtype == torch.float64 and t.device == like.device
        t.fill_(2.0)
        assert t.sum().item() == 2.0 * t.numel()


def test_disabled_kernels_say_why():
    env = dict(os.environ, DENSENET_KERNELS="0")
    code = "from densenet import kernels; import torch; print(kernels.available(torch.zeros(1)), kernels.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False disabled by DENSENET_KERNELS=0"


def test_without_a_compiler_the_model_falls_back_to_torch_ops_and_still_trains(tmp_path):
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), DENSENET_CACHE=str(tmp_path / "cache"),
               PATH=str(tmp_path))  # no cc, no gcc
    code = ("import torch; from densenet import kernels, densenet_cifar\n"
            "torch.manual_seed(0); m = densenet_cifar(16, growth_rate=4)\n"
            "m(torch.randn(2, 3, 8, 8)).sum().backward()\n"
            "print(kernels.available(torch.zeros(1)), '|', kernels.unavailable_reason(), '|',\n"
            "      m.features.denseblock1.denselayer1.conv1.weight.grad.abs().sum().item() > 0)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    available, reason, trained = [s.strip() for s in proc.stdout.split("|")]
    assert available == "False" and "no C compiler" in reason and trained == "True"
    assert "fused CPU kernels are unavailable (no C compiler found" in proc.stderr  # said once, not silent
    assert proc.stderr.count("RuntimeWarning") == 1


# ------------------------------------------------------------------------------ the buffer pool

_BIG = (1024, 1024, 4)  # 16 MiB of float32: large enough for the pool


def test_pool_hands_an_idle_buffer_out_again_and_never_one_in_use():
    kernels.release_buffers()
    like = torch.zeros(1)
    a = kernels.huge_empty(_BIG, like)
    ptr = a.data_ptr()
    view = a[3:5]  # a view keeps the storage in use
    del a
    b = kernels.huge_empty((4096, 1024), like)  # same bytes, other shape
    assert b.data_ptr() != ptr
    del view
    c = kernels.huge_empty((4096, 1024), like)
    assert c.data_ptr() == ptr and c.shape == (4096, 1024) and c.is_contiguous()
    assert kernels.huge_empty((1024, 1024, 2), like).data_ptr() not in (ptr, b.data_ptr())  # exact sizes only
    del b, c
    assert kernels.pooled_bytes() == 16 * 2**20 * 2 + 8 * 2**20
    assert kernels.release_buffers() == 16 * 2**20 * 2 + 8 * 2**20
    assert kernels.pooled_bytes() == 0


def test_pool_frees_idle_buffers_no_longer_asked_for():
    kernels.release_buffers()
    like = torch.zeros(1)
    kernels.huge_empty(_BIG, like)  # idle at once
    for _ in range(kernels._BufferPool._KEEP + 1):
        t = kernels.huge_empty((1024, 1024, 3), like)
        del t
    assert kernels.pooled_bytes() == 12 * 2**20  # only the size still in use
    kernels.release_buffers()


def test_pool_leaves_small_and_non_cpu_requests_alone_and_can_be_turned_off(monkeypatch):
    kernels.release_buffers()
    kernels.huge_empty((100, 100), torch.zeros(1))
    assert kernels.pooled_bytes() == 0
    monkeypatch.setenv("DENSENET_POOL", "0")
    a = kernels.huge_empty(_BIG, torch.zeros(1))
    assert kernels.pooled_bytes() == 0 and a.shape == _BIG


def test_training_steps_reuse_the_pooled_buffers_with_unchanged_results():
    from densenet import densenet_cifar
    kernels.release_buffers()
    torch.manual_seed(0)
    model = densenet_cifar(40, growth_rate=12, bottleneck=True, compression=0.5).to(memory_format=torch.channels_last)
    x = torch.randn(48, 3, 32, 32).to(memory_format=torch.channels_last)
    grads = []
    for _ in range(3):
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append(model.features.conv0.weight.grad.clone())
    held = kernels.pooled_bytes()
    assert held > 0
    model.zero_grad()
    model(x).square().mean().backward()
    assert kernels.pooled_bytes() == held  # the second and later steps allocate nothing new
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])  # fresh vs reused memory
    kernels.release_buffers()
