"""Vision data and models for the Lottery Ticket experiments: Fashion-MNIST in memory,
LeNet-300-100 and Conv-2 (Frankle & Carbin 2019)."""

from __future__ import annotations

from pruning_core.vision.data import (
    CLASSES,
    DEFAULT_ROOT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    INSTALL_HINT,
    ImageData,
    fashion_mnist_available,
    load_fashion_mnist,
    read_idx,
)
from pruning_core.vision.models import Conv2, LeNet300100, paper_layer_rates

__all__ = [
    "CLASSES",
    "DEFAULT_ROOT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "INSTALL_HINT",
    "Conv2",
    "ImageData",
    "LeNet300100",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "paper_layer_rates",
    "read_idx",
]
