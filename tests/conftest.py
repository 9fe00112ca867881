import json
import math
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


def train_digits(root, cache_dir, *, bits: int, epochs: int = 3):
    """A tiny model, trained as a user would (``fedhash train`` on scikit-learn's digits, 32 px); returns
    its run folder, the only one ``root`` then holds."""
    from simulations.cli import main

    rc = main(["train", "--data", "digits", "--bits", str(bits), "--size", "32", "--views", "2", "--n-train", "600",
               "--epochs", str(epochs), "--batch-size", "128", "--runs-dir", str(root), "--cache-dir", str(cache_dir)])
    assert rc == 0
    (run,) = list(root.iterdir())
    return run


def toml_text(values: dict) -> str:
    """A flat TOML document of ``values`` (scenario files in tests): booleans, strings, numbers (nan, inf
    included), lists and inline tables."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        return repr(v)
    return "".join(f"{json.dumps(k)} = {val(v)}\n" for k, v in values.items())
