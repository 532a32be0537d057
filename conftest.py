"""Shared test fixtures: tiny fake datasets in torchvision's on-disk layouts, so its own loaders run offline."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision

# Set before torch is imported (by common below): a thread per core of the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import harness  # noqa: E402


def run_main(mod, argv):
    """A script's main(argv) in-process, as its command line runs it: the exit code (errors go to stderr)."""
    return harness.cli(mod.main, argv)


def randomise(model):
    """Give the zero-initialised layers random weights so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def fake_images(n, size=28, channels=1, seed=0):
    """n uint8 images with a bright class-dependent bar (label = i % 10), so a model has something to learn."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 30, size=(n, size, size, channels), dtype=np.uint8)
    y = np.arange(n) % 10
    for i, c in enumerate(y):
        x[i, 2 + 2 * c: 4 + 2 * c, 4:size - 4] = 255
    return x, y.astype(np.uint8)


def write_idx(folder, prefix, x, y):
    """Write IDX files (magic 2051 images, 2049 labels, big-endian sizes) as torchvision expects them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">4i", 2051, len(x), x.shape[1], x.shape[2]) + x[..., 0].tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">2i", 2049, len(y)) + y.tobytes())


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    """--data-dir holding MNIST/raw and FashionMNIST/raw with 256 train and 64 test images."""
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        write_idx(root / name / "raw", "train", *fake_images(256))
        write_idx(root / name / "raw", "t10k", *fake_images(64, seed=1))
    return str(root)


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """--data-dir holding cifar-10-batches-py: 5 train batches of 40 images, a test batch and batches.meta."""
    cifar = torchvision.datasets.CIFAR10  # the fake batches cannot match torchvision's md5 sums of the real ones
    cifar._check_integrity = lambda self: True
    cifar.meta = {**cifar.meta, "md5": None}
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = fake_images(40, size=32, channels=3, seed=i)
        rows = x.transpose(0, 3, 1, 2).reshape(40, -1)  # rows of 3072 bytes, channel-planar, as in the real files
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return str(root)
