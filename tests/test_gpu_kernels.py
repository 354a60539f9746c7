"""The Triton kernels that do the dense block's element-wise work on a GPU, run by Triton's
interpreter on CPU tensors (in a process of its own, tests/triton_interpreted.py): each kernel
against a float64 formula in float32 and bfloat16, their argument checks, and whole training
steps of small DenseNets through them against the plain modules (float32, with and without
dropout) and against the float32 step (bf16 autocast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densenet import backends
from densenet.ops import cuda as gpu_kernels

SCRIPT = Path(__file__).with_name("triton_interpreted.py")
pytestmark = pytest.mark.skipif(gpu_kernels.triton is None, reason="Triton is not installed")


@pytest.fixture(scope="module")
def interpreted():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_each_kernel_computes_its_formula(interpreted, dtype, tol):
    errs = interpreted["kernels"][dtype]
    assert len(errs) == 18
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, (worst, errs[worst])
    # the ReLU mask and the channel sums are exact in bfloat16 too (float32 arithmetic)
    assert all(v < 1e-6 for k, v in errs.items() if "g'" in k and "dx" not in k.split(":")[1])


def test_a_kernel_called_with_a_wrong_argument_raises_instead_of_launching(interpreted):
    said = interpreted["errors"]
    assert said == {
        "out shape": "bn_relu: out must be a (8, 4) matrix like x, got (8, 5)",
        "scale length": "bn_relu: scale must have 4 elements (one per column of x), got 3 (3,)",
        "dtype": "bn_relu: x must be float32 or bfloat16 or float16, got torch.float64",
        "g dtype": "bn_relu_grad: g must be torch.float32 like x, got torch.bfloat16",
        "overlapping rows": "col_affine_add: out must have a row stride of at least its 4 columns "
                            "(rows would overlap), got strides (2, 1)",
        "column stride": "bn_grad_apply: out must have unit column stride, got strides (1, 8)",
        "sums shape": "bn_relu_grad: sums must be a floating (2, 4) tensor on cpu, got (2, 3)",
        "meta tensor": "bn_relu: x must be a CPU tensor, got one on meta",
    }


@pytest.mark.parametrize("case", ["DenseNet-BC", "basic DenseNet", "DenseNet-BC with dropout"])
def test_a_training_step_through_the_kernels_matches_the_plain_modules(interpreted, case):
    step = interpreted["block"][case]
    assert step["worst_rel"] < 1e-4  # outputs, input and parameter gradients, running stats
    # every kernel ran: nothing fell back to the torch ops
    assert set(step["calls"]) == {"bn_relu", "bn_relu_grad", "bn_grad_apply", "col_affine_add"}
    assert min(step["calls"].values()) >= 1


def test_under_bf16_autocast_the_kernels_are_as_close_to_float32_as_the_plain_modules(interpreted):
    err = interpreted["bf16"]  # global normwise error of the gradients against the float32 step
    assert err["triton"] <= 1.5 * err["reference"] + 0.02, err
    assert err["triton"] <= 1.5 * err["torch ops"] + 0.02, err
    assert min(err["calls"].values()) >= 1 and len(err["calls"]) == 4
    assert err["calls with triton off"] == {}  # densenet.backends.triton = False: the torch ops


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_outside_the_interpreter_the_kernels_want_cuda_tensors_and_cpu_keeps_its_own():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"^bn_relu: x must be a CUDA tensor, got one on cpu$"):
        gpu_kernels.bn_relu(x, torch.ones(4), torch.ones(4), torch.empty(8, 4))
    assert not gpu_kernels.available(x)  # CPU tensors: the C kernels, registered for the CPU key


def test_densenet_triton_0_turns_the_kernels_off():
    env = dict(os.environ, DENSENET_TRITON="0")
    code = "import densenet.backends as b; print(b.triton)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert backends.triton is (os.environ.get("DENSENET_TRITON", "1") != "0")
