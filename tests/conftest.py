import pytest
import torch

import transfer_fast

CUDA = torch.cuda.is_available() and transfer_fast.backend_status()["cuda"] == "available"

# Every kernel test runs on the CPU and, where a GPU and the CUDA kernels exist, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU and the CUDA kernels"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def backend_of(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"
