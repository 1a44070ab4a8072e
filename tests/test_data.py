"""Data: every source's code path on small generated data, the splits, seeded order."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from atcd_ray.data import DataError, TensorBatches, build_splits, build_test_split, split_indices
from atcd_ray.data.sources import FASHION_MNIST_DIR, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist_like(directory: Path, n_train=300, n_test=100, gz=True, suffix=".gz"):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), gz)


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz, name in [(True, "a.gz"), (False, "a")]:
        write_idx(tmp_path / name, array, gz)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    write_mnist_like(tmp_path, gz=gz, suffix=".gz" if gz else "")
    splits = build_splits("fashion-mnist", data_dir=str(tmp_path), batch_size=32, val_size=50, subset=None, eval_n=60,
                          val_n=None, seed=0)
    assert len(splits.train.labels) == 250 and len(splits.val.labels) == 50 and len(splits.test.labels) == 60
    x, y = next(iter(splits.train))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        build_splits("fashion-mnist", data_dir=str(tmp_path), batch_size=32, val_size=10, subset=None, eval_n=None,
                     val_n=None, seed=0)


def test_real_fashion_mnist_default_location():
    """Debian's dataset-fashion-mnist, which .ci/run installs, read from its default location."""
    assert Path(FASHION_MNIST_DIR).is_dir(), "apt-get install -y dataset-fashion-mnist"
    splits = build_splits("fashion-mnist", data_dir=None, batch_size=128, val_size=5000, subset=None, eval_n=None,
                          val_n=None, seed=0)
    assert len(splits.train.labels) == 55000 and len(splits.val.labels) == 5000 and len(splits.test.labels) == 10000
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10


def test_mnist_through_torchvision(tmp_path):
    """torchvision's MNIST reads the raw IDX files it would have downloaded."""
    write_mnist_like(tmp_path / "MNIST" / "raw", gz=False, suffix="")
    splits = build_splits("mnist", data_dir=str(tmp_path), batch_size=64, val_size=100, subset=128, eval_n=None,
                          val_n=None, seed=0)
    assert len(splits.train.labels) == 128 and len(splits.test.labels) == 100
    assert next(iter(splits.test))[0].shape == (64, 1, 28, 28)


def test_mnist_offline_error_names_the_fix(tmp_path, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="could not be downloaded.*download=True"):
        build_splits("mnist", data_dir=str(tmp_path), batch_size=64, val_size=10, subset=None, eval_n=None, val_n=None,
                     seed=0)


def make_cifar10(directory: Path, monkeypatch) -> None:
    """Generated batches in CIFAR-10's python layout (20 images each), torchvision's md5 check bypassed."""
    import torchvision

    root = directory / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 20).tolist()}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    """Generated batches in CIFAR-10's python layout, read by torchvision (its md5 check bypassed)."""
    make_cifar10(tmp_path, monkeypatch)
    splits = build_splits("cifar10", data_dir=str(tmp_path), batch_size=16, val_size=10, subset=None, eval_n=None,
                          val_n=None, seed=0)
    assert len(splits.train.labels) == 90 and len(splits.test.labels) == 20
    x, _ = next(iter(splits.train))
    assert x.shape == (16, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert splits.train.augment == "crop_flip" and splits.test.augment == "none"


def make_image_folder(root: Path, classes=3, per_class=6, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ["train", "val"]:
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")


def test_imagenet_folder(tmp_path):
    make_image_folder(tmp_path)
    splits = build_splits("imagenet", data_dir=str(tmp_path), batch_size=4, val_size=3, subset=None, eval_n=None,
                          val_n=None, seed=0, loader_workers=0)
    x, y = next(iter(splits.train))
    assert x.shape == (4, 3, 224, 224) and 0 <= x.min() and x.max() <= 1 and y.max() < 3
    assert len(splits.train) == 15 // 4 and splits.val.num_examples == 3 and splits.test.num_examples == 18
    xt, _ = next(iter(splits.test))
    assert xt.shape == (4, 3, 224, 224)


def test_the_test_split_alone_reads_no_training_data(tmp_path):
    """What an evaluation loads: the same examples as build_splits' test split, from a directory
    that holds the test files only (so nothing of the training set is read)."""
    from atcd_ray.data.sources import check_available

    write_mnist_like(tmp_path / "both")
    both = build_splits("fashion-mnist", data_dir=str(tmp_path / "both"), batch_size=32, val_size=50, subset=None,
                        eval_n=60, val_n=None, seed=0).test
    (tmp_path / "test").mkdir()
    for f in (tmp_path / "both").glob("t10k-*"):
        f.rename(tmp_path / "test" / f.name)
    alone = build_test_split("fashion-mnist", data_dir=str(tmp_path / "test"), batch_size=32, eval_n=60)
    assert torch.equal(alone.images, both.images) and torch.equal(alone.labels, both.labels)
    with pytest.raises(DataError):  # positive control: the whole splits need the training files
        build_splits("fashion-mnist", data_dir=str(tmp_path / "test"), batch_size=32, val_size=50, subset=None,
                     eval_n=60, val_n=None, seed=0)
    make_image_folder(tmp_path / "imagenet")
    whole = build_splits("imagenet", data_dir=str(tmp_path / "imagenet"), batch_size=4, val_size=3, subset=None,
                         eval_n=10, val_n=None, seed=0, loader_workers=0).test
    (tmp_path / "imagenet" / "train").rename(tmp_path / "train-elsewhere")
    check_available("imagenet", str(tmp_path / "imagenet"), test_only=True)
    with pytest.raises(DataError, match="ImageFolder"):
        check_available("imagenet", str(tmp_path / "imagenet"))
    test = build_test_split("imagenet", data_dir=str(tmp_path / "imagenet"), batch_size=4, eval_n=10, loader_workers=0)
    assert test.num_examples == whole.num_examples == 10
    assert all(torch.equal(a, b) for (xa, ya), (xb, yb) in zip(test, whole) for a, b in ((xa, xb), (ya, yb)))


def test_imagenet_missing_tree(tmp_path):
    with pytest.raises(DataError, match="ImageFolder"):
        build_splits("imagenet", data_dir=str(tmp_path), batch_size=4, val_size=3, subset=None, eval_n=None,
                     val_n=None, seed=0)


def test_validation_split_is_fixed_and_disjoint():
    train_a, val_a = split_indices(1000, 100)
    train_b, val_b = split_indices(1000, 100)
    assert torch.equal(val_a, val_b) and len(set(train_a.tolist()) & set(val_a.tolist())) == 0
    assert len(train_a) + len(val_a) == 1000
    assert torch.all(train_a[1:] > train_a[:-1])  # training keeps the file order, so subset = first N


def test_subset_is_first_n_and_split_ignores_seed(digits_splits):
    a = build_splits("digits", data_dir=None, batch_size=64, val_size=197, subset=200, eval_n=None, val_n=None, seed=5)
    assert torch.equal(a.train.images, digits_splits.train.images[:200])
    assert torch.equal(a.val.images, digits_splits.val.images)


def test_shuffle_is_seeded_per_epoch():
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1)
    labels = torch.arange(64)
    loader = TensorBatches(images, labels, 8, shuffle=True, drop_last=True, seed=3)
    order = lambda epoch: (loader.set_epoch(epoch), torch.cat([y for _, y in loader]))[1]  # noqa: E731
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert sorted(order(1).tolist()) == list(range(64))


def test_the_digits_read_from_scikit_learns_file_are_load_digits():
    from sklearn.datasets import load_digits

    from atcd_ray.data.sources import digits_arrays

    images, target = digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    assert images.shape == (1797, 8, 8) and target.dtype == reference.target.dtype
