import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two test workers on two cores; subprocesses inherit it


@pytest.fixture(scope="session")
def tiny():
    """The tiny random family (seed 0), built once per test process."""
    import torch

    torch.set_num_threads(1)
    from relaydiff.engine.family import tiny_family

    return tiny_family(0)
