"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` idx files, held in memory as tensors.

Stage: data (used by the Lottery Ticket experiments). The idx format (LeCun's MNIST format) is a
big-endian header ``0x0000 <dtype> <ndim>`` followed by ``ndim`` uint32 sizes and the raw
uint8 payload. Images are returned as float32 ``[N, 1, 28, 28]``, scaled to [0, 1] and then
standardised with the training-set mean and standard deviation; labels as int64 ``[N]``.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning_core.errors import ArtifactError, ConfigError, ShapeMismatch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
# Mean and standard deviation of the 60k training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UBYTE = 0x08


@dataclass(frozen=True)
class ImageData:
    """An in-memory labelled image set.

    Attributes:
        images: float32 ``[N, C, H, W]``.
        labels: int64 ``[N]`` class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.labels.dim() != 1 or self.images.shape[0] != self.labels.shape[0]:
            raise ShapeMismatch(
                "images [N, C, H, W] with labels [N]",
                [*self.images.shape, *self.labels.shape],
                name="ImageData",
                reason=f"images {list(self.images.shape)} vs labels {list(self.labels.shape)}",
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, *, seed: int = 0) -> ImageData:
        """``n`` examples drawn without replacement by a permutation seeded with ``seed``."""
        if not 0 < n <= len(self):
            raise ConfigError("n", f"subset size must be in [1, {len(self)}], got {n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageData(self.images[idx].contiguous(), self.labels[idx].contiguous())

    def to(self, device: torch.device | str) -> ImageData:
        """A copy on ``device``."""
        return ImageData(self.images.to(device), self.labels.to(device))


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read a (gzipped) idx file of unsigned bytes into a uint8 tensor of the header's shape.

    Raises:
        ArtifactError: the file is missing (the message names the apt package), or its header
            or length is inconsistent.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(
            str(p),
            f"Fashion-MNIST file not found; install it with `{INSTALL_HINT}` or pass root=<dir with the idx files>",
        )
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ArtifactError(str(p), f"cannot read idx file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE:
        raise ArtifactError(str(p), f"not an unsigned-byte idx file (magic bytes {list(raw[:4])})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(torch.Size(shape).numel())
    if len(raw) != expected:
        raise ArtifactError(str(p), f"idx header {list(shape)} needs {expected} bytes, file has {len(raw)}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def fashion_mnist_available(root: str | os.PathLike[str] = DEFAULT_ROOT) -> bool:
    """True if ``root`` holds the four Fashion-MNIST idx files (for skip guards; nothing is read)."""
    return all((Path(root) / name).is_file() for files in _FILES.values() for name in files)


def load_fashion_mnist(
    split: str = "train", *, root: str | os.PathLike[str] = DEFAULT_ROOT, normalize: bool = True
) -> ImageData:
    """Load the Fashion-MNIST ``split`` ("train": 60,000 images, "test": 10,000).

    Args:
        split: "train" or "test".
        root: directory holding the four ``*-idx?-ubyte.gz`` files (Debian's path by default).
        normalize: standardise pixels with :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`
            (otherwise they are in [0, 1]).

    Returns:
        ImageData with images float32 ``[N, 1, 28, 28]`` and labels int64 ``[N]``.

    Raises:
        ConfigError: unknown split.
        ArtifactError: a file is missing or corrupt; the message names the path and the apt command.
    """
    if split not in _FILES:
        raise ConfigError("split", f"expected one of {sorted(_FILES)}, got {split!r}")
    image_file, label_file = _FILES[split]
    images = read_idx(Path(root) / image_file)
    labels = read_idx(Path(root) / label_file)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ArtifactError(
            str(root), f"{split} images {list(images.shape)} do not match labels {list(labels.shape)}"
        )
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)  # [N, 1, 28, 28]
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return ImageData(x, labels.to(torch.int64))


__all__ = [
    "CLASSES",
    "DEFAULT_ROOT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "INSTALL_HINT",
    "ImageData",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "read_idx",
]
