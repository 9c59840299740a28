import pytest
import torch

# Every kernel test runs on the CPU and, where a GPU exists, on CUDA. A GPU machine
# whose build left the CUDA kernels out fails those tests rather than skipping them.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def backend_of(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"
