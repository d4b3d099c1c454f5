"""Time facebookresearch/open_lth's LeNet-300-100 training on our Fashion-MNIST files.

Used by ``bench_lottery.py`` (one process per timed run, alternating with ours); runnable alone:

    PYTHONPATH=. python benchmarks/_open_lth_reference.py --mode standard --steps 5000

The reference is the fetched snapshot github:facebookresearch/open_lth (@2ce732f) at
``/work/.mirror/facebookresearch+open_lth/repo``, cloned fresh under ``--ref-root`` (never
committed) and changed there only by the exact-string replacements in ``PATCHES`` (each with its
reason) plus one added file, ``datasets/fashionmnist.py`` (``FASHION_MNIST``: a copy of their MNIST
class that reads Debian's idx files instead of downloading MNIST; same PIL + ``ToTensor`` +
``Normalize`` path, with Fashion-MNIST's mean and std). open_lth needs torchvision for those
transforms; ``torchvision==0.28.0`` (the release paired with torch 2.13; the only build the local
index has is the CUDA one) is installed with ``pip --no-deps --target <ref-root>/torchvision``
and ``TORCHVISION_PATCHES`` applied to it there.

Modes (both on one torch thread, their default ``num_workers=0``, Adam lr 1.2e-3, batch 60,
``<steps>it``, their default kaiming-normal init):

* ``standard``: what their lottery runner does for one level (``lottery/runner.py``
  ``_train_level``): ``PrunedModel(model, mask)`` with an all-ones ``Mask`` (the dense level),
  then ``training.train.standard_train`` with ``evaluate_every_epoch=False`` (their
  ``--evaluate_only_at_end``: test set before and after training, checkpoint every epoch, model
  saved at start and end). Timed from the call, so building their data loaders is included.
* ``loop``: ``training.train.train`` on the plain model with no callbacks, i.e. their
  DataLoader-based training loop alone (the loader is built before the clock starts).

The worker prints one JSON line: ``{"mode", "steps", "seconds" (wall), "cpu_seconds" (this
process), "test_accuracy" (standard only), "commit"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIRROR = Path("/work/.mirror/facebookresearch+open_lth/repo")
DEFAULT_ROOT = Path("/tmp/open_lth_ref")
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION = "torchvision==0.28.0"

# (file, old, new, reason): exact strings, each must occur exactly once.
PATCHES: list[tuple[str, str, str, str]] = [
    ("training/optimizers.py",
     "lambda it: np.product([l(it) for l in lambdas])",
     "lambda it: np.prod([l(it) for l in lambdas])",
     "np.product was removed in numpy 2 (numpy 2.4 here); np.prod is the same function"),
    ("models/base.py",
     "class DistributedDataParallel(Model, torch.nn.parallel.DistributedDataParallel):",
     "class DistributedDataParallel(Model):",
     "torch 2.x's DistributedDataParallel also derives from an ABC (Joinable), so the class statement "
     "fails with an MRO error at import; it is only used when distributed, never on one CPU"),
    ("datasets/registry.py",
     "from datasets import base, cifar10, mnist, imagenet\n",
     "from datasets import base, cifar10, mnist, imagenet, fashionmnist\n",
     "register the added Fashion-MNIST dataset (1/2)"),
    ("datasets/registry.py",
     "registered_datasets = {'cifar10': cifar10, 'mnist': mnist, 'imagenet': imagenet}",
     "registered_datasets = {'cifar10': cifar10, 'mnist': mnist, 'imagenet': imagenet, "
     "'fashionmnist': fashionmnist}",
     "register the added Fashion-MNIST dataset (2/2)"),
]
TORCHVISION_PATCHES: list[tuple[str, str, str, str]] = [
    ("torchvision/__init__.py", "    _meta_registrations,\n", "",
     "the index's 0.28.0 wheel is the CUDA build, whose C ops (nms, roi_align, ...) cannot load "
     "against the CPU torch; registering their meta kernels then raises. open_lth uses only "
     "torchvision.transforms (ToTensor, Normalize), which do not touch those ops"),
]

# Added as datasets/fashionmnist.py: their datasets/mnist.py with the idx files read locally.
# Image.fromarray without mode='L' (Pillow 13 removed the argument; a 2-D uint8 array is 'L').
FASHION_MNIST = '''\
"""Fashion-MNIST from local idx files (added for the benchmark; modelled on datasets/mnist.py)."""

import gzip
import os

import numpy as np
from PIL import Image
import torchvision

from datasets import base
from platforms.platform import get_platform


def _read_idx(path):
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    shape = np.frombuffer(raw[4:4 + 4 * ndim], dtype='>u4').astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


def _load(prefix):
    root = get_platform().dataset_root
    return (_read_idx(os.path.join(root, prefix + '-images-idx3-ubyte.gz')),
            _read_idx(os.path.join(root, prefix + '-labels-idx1-ubyte.gz')).astype(np.int64))


class Dataset(base.ImageDataset):
    """The Fashion-MNIST dataset."""

    @staticmethod
    def num_train_examples(): return 60000

    @staticmethod
    def num_test_examples(): return 10000

    @staticmethod
    def num_classes(): return 10

    @staticmethod
    def get_train_set(use_augmentation):
        return Dataset(*_load('train'))

    @staticmethod
    def get_test_set():
        return Dataset(*_load('t10k'))

    def __init__(self, examples, labels):
        tensor_transforms = [torchvision.transforms.Normalize(mean=[0.2860], std=[0.3530])]
        super(Dataset, self).__init__(examples, labels, [], tensor_transforms)

    def example_to_image(self, example):
        return Image.fromarray(example)


DataLoader = base.DataLoader
'''


def _apply(root: Path, patches: list[tuple[str, str, str, str]]) -> None:
    for file, old, new, _why in patches:
        path = root / file
        text = path.read_text()
        if text.count(old) != 1:
            raise RuntimeError(f"patch for {path} does not apply (found {text.count(old)} times): {old!r}")
        path.write_text(text.replace(old, new))


def prepare(ref_root: Path) -> dict[str, str]:
    """Fresh clone + ``PATCHES`` + the dataset file; torchvision installed once. Returns paths and commit."""
    repo, tv = ref_root / "open_lth", ref_root / "torchvision"
    subprocess.run(["rm", "-rf", str(repo)], check=True)
    ref_root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(MIRROR), str(repo)], check=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    _apply(repo, PATCHES)
    (repo / "datasets" / "fashionmnist.py").write_text(FASHION_MNIST)
    if not (tv / ".patched").is_file():  # install and patch once per --ref-root
        subprocess.run(["rm", "-rf", str(tv)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tv), TORCHVISION],
                       check=True)
        _apply(tv, TORCHVISION_PATCHES)
        (tv / ".patched").write_text(TORCHVISION + "\n")
    return {"repo": str(repo), "torchvision": str(tv), "commit": commit}


def worker(mode: str, steps: int, data_root: Path, threads: int, commit: str) -> dict[str, object]:
    """Run inside a process whose sys.path starts with the patched checkout and torchvision."""
    import torch

    torch.set_num_threads(threads)
    from platforms import local, platform

    class Platform(local.Platform):
        @property
        def dataset_root(self) -> str:
            return str(data_root)

    platform._PLATFORM = Platform()  # what their CLI does (platform.run_job); num_workers=0
    import datasets.registry
    import models.registry
    from foundations import hparams
    from pruning.mask import Mask
    from pruning.pruned_model import PrunedModel
    from training import train
    from training.metric_logger import MetricLogger

    model_h = hparams.ModelHparams(model_name="mnist_lenet_300_100", model_init="kaiming_normal",
                                   batchnorm_init="uniform")
    data_h = hparams.DatasetHparams(dataset_name="fashionmnist", batch_size=60)
    train_h = hparams.TrainingHparams(optimizer_name="adam", lr=1.2e-3, training_steps=f"{steps}it")
    torch.manual_seed(0)
    model = models.registry.get(model_h)
    out = tempfile.mkdtemp(prefix="open_lth_run_")  # fresh: their train() resumes from checkpoints found here
    result: dict[str, object] = {"mode": mode, "steps": steps, "commit": commit, "threads": threads}
    if mode == "standard":
        pruned = PrunedModel(model, Mask.ones_like(model))
        w0, c0 = time.perf_counter(), time.process_time()
        train.standard_train(pruned, out, data_h, train_h, verbose=False, evaluate_every_epoch=False)
        w1, c1 = time.perf_counter(), time.process_time()
        log = MetricLogger.create_from_file(out)
        result["test_accuracy"] = max(log.get_data("test_accuracy"))[1]
    else:
        loader = datasets.registry.get(data_h, train=True)
        w0, c0 = time.perf_counter(), time.process_time()
        train.train(train_h, model, loader, out, callbacks=[])
        w1, c1 = time.perf_counter(), time.process_time()
    subprocess.run(["rm", "-rf", out], check=True)
    return {**result, "seconds": w1 - w0, "cpu_seconds": c1 - c0}


def run(mode: str, steps: int, *, ref: dict[str, str], data_root: Path = DEFAULT_DATA,
        threads: int = 1) -> dict[str, object]:
    """One timed run in a fresh process (``ref`` from :func:`prepare`); returns the worker's JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join((ref["torchvision"], ref["repo"])), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--steps", str(steps), "--data-root",
           str(data_root), "--threads", str(threads), "--commit", ref["commit"]]
    res = subprocess.run(cmd, cwd=ref["repo"], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"open_lth {mode} run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["standard", "loop"], default="standard")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ref-root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--commit", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        print(json.dumps(worker(args.mode, args.steps, args.data_root, args.threads, args.commit)), flush=True)
        return 0
    ref = prepare(args.ref_root)
    for _ in range(args.repeats):
        print(json.dumps(run(args.mode, args.steps, ref=ref, data_root=args.data_root, threads=args.threads)),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
