"""Fashion-MNIST idx reading, the paper's models, and one real IMP run on a Fashion-MNIST subset."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from pruning_core.errors import ArtifactError, ConfigError, ShapeMismatch
from pruning_core.lottery import (
    CONTROLS,
    ClassifierTrainFn,
    LotteryTicketConfig,
    LotteryTicketPruner,
    TrainingConfig,
    evaluate,
)
from pruning_core.vision import (
    Conv2,
    ImageData,
    LeNet300100,
    fashion_mnist_available,
    load_fashion_mnist,
    paper_layer_rates,
    read_idx,
)

needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist is not installed")


def _write_idx(path, array: list[list[int]] | list[int], dims: tuple[int, ...]) -> None:
    flat = bytes(v for row in array for v in (row if isinstance(row, list) else [row]))
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as f:
        f.write(header + flat)


def test_read_idx_golden(tmp_path) -> None:
    _write_idx(tmp_path / "x.gz", [[1, 2, 3], [4, 5, 255]], (2, 3))
    assert read_idx(tmp_path / "x.gz").tolist() == [[1, 2, 3], [4, 5, 255]]


def test_read_idx_errors(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="apt-get install dataset-fashion-mnist") as info:
        read_idx(tmp_path / "missing.gz")
    assert str(tmp_path / "missing.gz") in str(info.value)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab"))
    with pytest.raises(ArtifactError, match="unsigned-byte"):
        read_idx(tmp_path / "bad.gz")
    _write_idx(tmp_path / "short.gz", [1, 2], (3,))
    with pytest.raises(ArtifactError, match="needs 11 bytes"):
        read_idx(tmp_path / "short.gz")


def test_missing_dataset_names_path_and_apt_command(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist("test", root=tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ConfigError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)


def test_fashion_mnist_available_needs_all_four_files(tmp_path) -> None:
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    for name in names[:3]:
        (tmp_path / name).write_bytes(b"")
    assert not fashion_mnist_available(tmp_path)  # the guard must not pass with the test labels missing
    (tmp_path / names[3]).write_bytes(b"")
    assert fashion_mnist_available(tmp_path) and not fashion_mnist_available(tmp_path / "nothing")


def test_image_data_checks_and_subset() -> None:
    with pytest.raises(ShapeMismatch):
        ImageData(torch.zeros(3, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    d = ImageData(torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10))
    s = d.subset(4, seed=1)
    assert len(s) == 4 and torch.equal(s.images.flatten().long(), s.labels)
    assert torch.equal(s.labels, d.subset(4, seed=1).labels)
    with pytest.raises(ConfigError):
        d.subset(11)


@needs_data
def test_fashion_mnist_test_split() -> None:
    d = load_fashion_mnist("test")
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.float32
    assert d.labels.bincount().tolist() == [1000] * 10
    raw = load_fashion_mnist("test", normalize=False).images
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0


def test_models_shapes_init_and_paper_rates() -> None:
    lenet = LeNet300100(generator=torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for n, p in lenet.named_parameters() if n.endswith("weight")] == [
        (300, 784), (100, 300), (10, 100),
    ]
    assert lenet(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    again = LeNet300100(generator=torch.Generator().manual_seed(0))
    assert torch.equal(lenet.hidden[0].weight, again.hidden[0].weight)
    assert float(lenet.hidden[0].bias.detach().abs().sum()) == 0.0
    std = float(lenet.hidden[0].weight.detach().std())
    assert std == pytest.approx((2 / (784 + 300)) ** 0.5, rel=0.05)  # Glorot normal
    conv = Conv2(channels=(4, 4), hidden=(8, 8))
    assert conv(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert paper_layer_rates(lenet) == {"hidden.0.weight": 0.2, "hidden.1.weight": 0.2, "output.weight": 0.1}
    assert paper_layer_rates(conv)["conv.1.weight"] == 0.1
    with pytest.raises(ConfigError, match="hidden"):
        LeNet300100(hidden=(300, 0))


@needs_data
def test_imp_really_trains_lenet_on_fashion_mnist() -> None:
    train = load_fashion_mnist("train").subset(6000, seed=0)
    test = load_fashion_mnist("test").subset(2000, seed=0)
    model = LeNet300100(generator=torch.Generator().manual_seed(0))
    chance = evaluate(model, test.images, test.labels)["accuracy"]
    fn = ClassifierTrainFn(train.images, train.labels, TrainingConfig(), test=(test.images, test.labels))
    cfg = LotteryTicketConfig(
        target_sparsity=None, prune_rate_per_round=0.5, pruning_rounds=2, global_pruning=False,
        layer_rates=paper_layer_rates(model) | {"hidden.0.weight": 0.5, "hidden.1.weight": 0.5}, training_steps=300,
        rewind_strategy="early:30",
    )
    ticket = LotteryTicketPruner(cfg).find_ticket(model, fn, controls=CONTROLS, progress=False)
    accs = [r.metrics["accuracy"] for r in ticket.records]
    assert chance < 0.25
    assert min(accs) > 0.75, accs  # chance is 0.1; 300 steps of Adam reach ~0.83
    assert ticket.layer_density["hidden.0.weight"] == 0.25
    assert all(c["accuracy"] > 0.6 for c in ticket.records[-1].controls.values())
    # The model left behind is the final ticket, and it evaluates to the recorded accuracy.
    assert evaluate(model, test.images, test.labels)["accuracy"] == pytest.approx(accs[-1])


def test_imp_on_conv2_prunes_conv_kernels_at_the_paper_rates() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 28, 28, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    model = Conv2(channels=(4, 4), hidden=(16, 16), generator=gen)
    cfg = LotteryTicketConfig(
        target_sparsity=None, prune_rate_per_round=0.2, pruning_rounds=2, global_pruning=False,
        layer_rates=paper_layer_rates(model), training_steps=10,
    )
    fn = ClassifierTrainFn(x, y, TrainingConfig(batch_size=32))
    ticket = LotteryTicketPruner(cfg).find_ticket(model, fn, progress=False)
    conv = ticket.masks["conv.1.weight"]
    assert conv.shape == (4, 4, 3, 3) and int(conv.sum()) == round(144 * 0.9**2)
    assert int(ticket.masks["hidden.0.weight"].sum()) == round(16 * 784 * 0.8**2)
    assert int(model.conv[1].weight.detach()[~conv].count_nonzero()) == 0
