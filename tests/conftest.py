"""Shared fixtures. Tests run on CPU with a small, fixed thread count for reproducibility."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KFACBOUND_TEST_THREADS", "1")))

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_available() -> bool:
    return os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))


requires_fashion = pytest.mark.skipif(
    not fashion_available(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)",
)


@pytest.fixture
def tiny_binary():
    """200 binary MNIST-5k digits downsampled to 8x8 (a fast real dataset)."""
    from kfacbound.data import load_dataset

    return load_dataset("mnist5k", binary=True, subset=200, downsample=8)


@pytest.fixture(scope="module")
def trained():
    """(X, y, w0 model, trained model): the toy one-logit problem of tests/test_certify.py."""
    from .test_certify import toy_data, toy_model, train

    X, y = toy_data()
    _, init, model = toy_model()
    return X, y, init, train(model, X, y)
