"""Where each dataset's images come from: one reader per source, all returning uint8 NCHW tensors.

Fashion-MNIST is read from its IDX files (Debian's ``dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist); MNIST and CIFAR-10 go through torchvision (downloaded where
the network allows); the scikit-learn digits ship with scikit-learn; ImageNet is an ImageFolder tree.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import torch


class DataError(RuntimeError):
    """The data is missing or unreadable; the message says how to get it."""


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an IDX file of unsigned bytes")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    return None


def fashion_mnist(data_dir: str | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    directory = Path(data_dir or FASHION_MNIST_DIR)
    prefix = "train" if train else "t10k"
    images = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DataError(
            f"Fashion-MNIST IDX files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
            f"not found in {directory}. Get them with: apt-get install -y dataset-fashion-mnist "
            f"(or pass --data-dir DIR holding the IDX files)"
        )
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _one_line(err: Exception, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _torchvision(cls_name: str, data_dir: str | None, train: bool):
    import torchvision

    root = Path(data_dir or "data")
    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises URLError/RuntimeError variants when offline
        raise DataError(
            f"{cls_name} is not in {root} and could not be downloaded ({type(err).__name__}: {_one_line(err)}). "
            f"On a machine with internet run: python -c \"import torchvision; "
            f"torchvision.datasets.{cls_name}('{root}', download=True)\" and pass --data-dir {root}"
        ) from err


def mnist(data_dir: str | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ds = _torchvision("MNIST", data_dir, train)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def cifar10(data_dir: str | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ds = _torchvision("CIFAR10", data_dir, train)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' 8x8 images (values 0-16) and labels, read from the CSV file scikit-learn ships
    (what ``load_digits`` reads) without importing scikit-learn: its import takes about 2 s, paid
    by every process that loads the digits (each Ray worker, each test's run). ``load_digits`` is
    the fallback where the file is not where scikit-learn 1.x keeps it. Read once a process: the
    training and the test split both come from it (callers copy, never write, the arrays)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(csv, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits(data_dir: str | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, upsampled to 28x28 so the MNIST networks apply.

    There is no official split: the first 1297 images train, the last 500 test.
    """
    images, target = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=28, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(target, dtype=torch.long)
    return (x[:1297], y[:1297]) if train else (x[1297:], y[1297:])


IN_MEMORY = {"fashion-mnist": fashion_mnist, "mnist": mnist, "cifar10": cifar10, "digits": digits}


def imagenet_folder(data_dir: str | None, train: bool):
    """An ImageNet-style tree: DIR/train/CLASS/*.JPEG and DIR/val/CLASS/*.JPEG."""
    import torchvision

    if data_dir is None:
        raise DataError("imagenet needs --data-dir DIR with DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG")
    split = Path(data_dir) / ("train" if train else "val")
    if not split.is_dir():
        raise DataError(f"{split} does not exist; ImageNet needs DIR/train/<class>/ and DIR/val/<class>/ (ImageFolder layout)")
    return torchvision.datasets.ImageFolder(str(split))


def beton_files(directory: str, dataset: str) -> tuple[Path, Path]:
    """DIR/train.beton and DIR/val.beton, or a DataError with the command that writes them."""
    files = Path(directory) / "train.beton", Path(directory) / "val.beton"
    for f in files:
        if not f.is_file():
            raise DataError(f"{f} does not exist: python -m atcd_ray.write_ffcv {dataset} --split {f.stem} --out {f}")
    return files


def check_available(dataset: str, data_dir: str | None, ffcv_dir: str | None = None, test_only: bool = False) -> None:
    """Raise DataError now if the dataset is missing, before workers are started to read it.
    ``test_only``: an evaluation's check (its test split is all it reads)."""
    if ffcv_dir is not None:
        if importlib.util.find_spec("ffcv") is None:
            raise DataError("data.ffcv_dir is set but FFCV is not installed: install the ffcv extra "
                            "(scripts/setup.sh) or leave data.ffcv_dir unset")
        beton_files(ffcv_dir, dataset)
    if dataset == "imagenet":
        if not test_only:
            imagenet_folder(data_dir, train=True)
        imagenet_folder(data_dir, train=False)
    else:
        IN_MEMORY[dataset](data_dir, train=False)
