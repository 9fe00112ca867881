import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One feature cache for the whole test session."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def digits():
    from hashing.data import load_digits

    return load_digits()


def write_png(path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
