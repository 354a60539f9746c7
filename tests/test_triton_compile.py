"""The Triton kernels compile for real GPUs - Ampere (sm_80, A100) and Hopper (sm_90, H100/H200) -
on a machine without one: Triton's compiler needs only the target, not the device. Every kernel
in every dtype and constexpr combination the wrappers launch (``densenet.ops.cuda.LAUNCHES``)
is compiled to a cubin, so a kernel that the interpreter runs but the GPU compiler rejects
(a type error, an unsupported op, too many registers) fails here, not on the first lent GPU."""

import itertools

import pytest
import torch

from densenet.ops import cuda

pytestmark = pytest.mark.skipif(cuda.triton is None, reason="Triton is not installed")

TARGETS = {"sm_80": 80, "sm_90": 90}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _signature(params, dtype):
    sig = {}
    for name, kind in params:
        sig[name] = {"map": "*" + TRITON_TYPES[dtype], "f32": "*fp32", "int": "i32",
                     "constexpr": "constexpr"}[kind]
    return sig


def _launches():
    for name, spec in cuda.LAUNCHES.items():
        for dtype, constexprs in itertools.product(cuda.TYPES, spec["constexprs"]):
            flags = ",".join(f"{k}={int(v)}" for k, v in constexprs.items() if k not in ("BM", "BC"))
            yield pytest.param(name, dtype, constexprs,
                               id=f"{name}-{TRITON_TYPES[dtype]}" + (f"-{flags}" if flags else ""))


def test_the_launch_table_lists_each_kernels_parameters_in_order():
    for name, spec in cuda.LAUNCHES.items():
        kernel = getattr(cuda, spec["kernel"])
        assert [p for p, _ in spec["params"]] == list(kernel.arg_names), name
        constexpr = [p for p, kind in spec["params"] if kind == "constexpr"]
        assert all(set(c) == set(constexpr) for c in spec["constexprs"]), name
    # bn_relu_grad: with or without dx (assigned or added to), with or without z
    assert len(cuda.LAUNCHES["bn_relu_grad"]["constexprs"]) == 6


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name, dtype, constexprs", list(_launches()))
def test_every_kernel_compiles_for_the_gpu(name, dtype, constexprs, target):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    spec = cuda.LAUNCHES[name]
    kernel = getattr(cuda, spec["kernel"])
    source = ASTSource(kernel, _signature(spec["params"], dtype), constexprs=constexprs)
    compiled = cuda.triton.compile(source, target=GPUTarget("cuda", TARGETS[target], 32))
    assert compiled.asm["cubin"][:4] == b"\x7fELF"  # a device binary
    assert f".target {target}" in compiled.asm["ptx"]
    assert compiled.metadata.name == spec["kernel"]


def test_a_launch_outside_the_table_is_refused():
    with pytest.raises(ValueError, match="no compiled combination"):
        cuda._launch("bn_relu_grad", 1, 1, HAS_DX=False, ASSIGN=True, HAS_Z=False)
