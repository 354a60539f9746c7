"""The ``device`` fixture: a test that takes it runs once on the CPU and once on a CUDA GPU.

The CUDA twin carries the ``cuda`` marker (``pytest -m cuda`` runs only those; where PyTorch
sees no GPU they are skipped, saying so), the CPU twin the ``cpu`` marker (``pytest -m cpu``:
what ``benchmarks/gpu_check.py --device cpu`` runs), so both halves can be chosen alone.
"""

import pytest
import torch

NO_GPU = "PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False)"


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: the CPU twin of a test that takes the device fixture")


@pytest.fixture(params=[
    pytest.param("cpu", marks=pytest.mark.cpu),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]),
])
def device(request):
    return torch.device(request.param)
