import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def gen() -> torch.Generator:
    """Seeded CPU generator: every random tensor in a test comes from it."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
