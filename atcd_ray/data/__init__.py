"""Datasets: a registry of what each dataset is, and batch iterators yielding float inputs in [0, 1].

The training set is split once, by a fixed permutation independent of the run seed, into a
held-out validation part (for best-checkpoint selection) and the training part; ``subset`` then
keeps the first N training examples. Shuffling is seeded per epoch, so a run, and a resumed run,
sees the same sequence of minibatches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batches import FolderBatches, Sharded, TensorBatches
from .sources import IN_MEMORY, DataError, beton_files, imagenet_folder

__all__ = ["DATASETS", "DatasetSpec", "DataError", "Sharded", "Splits", "TensorBatches", "build_splits",
           "build_test_split"]


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None  # normalisation inside the model; None = identity
    std: tuple[float, ...] | None
    default_recipe: str
    augment: str = "none"  # "crop_flip" for CIFAR-10; ImageNet uses torchvision transforms


_GRAY_28 = {"num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None}
DATASETS = {
    "fashion-mnist": DatasetSpec(**_GRAY_28, default_recipe="fashion-mnist_compactcnn.yaml"),
    "mnist": DatasetSpec(**_GRAY_28, default_recipe="mnist_smallcnn.yaml"),
    "digits": DatasetSpec(**_GRAY_28, default_recipe="digits_compactcnn.yaml"),
    "cifar10": DatasetSpec(num_classes=10, in_channels=3, image_size=32, mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2471, 0.2435, 0.2616), default_recipe="cifar10_preactresnet18.yaml",
                           augment="crop_flip"),
    "imagenet": DatasetSpec(num_classes=1000, in_channels=3, image_size=224, mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225), default_recipe="imagenet_resnet50.yaml"),
}

SPLIT_SEED = 20201011  # fixed: the validation split must not move with the run seed


@dataclass
class Splits:
    train: Sharded
    val: Sharded
    test: Sharded
    spec: DatasetSpec

    def shard(self, rank: int, world_size: int) -> None:
        for split in (self.train, self.val, self.test):
            split.shard(rank, world_size)


def split_indices(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: val is a fixed random subset; train keeps the original order."""
    if not 0 <= val_size < n:
        raise DataError(f"val_size must be in [0, {n}), got {val_size}")
    val = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:val_size]
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().squeeze(1), val.sort().values


def build_splits(dataset: str, *, data_dir: str | None, batch_size: int, val_size: int, subset: int | None,
                 eval_n: int | None, val_n: int | None, seed: int, loader_workers: int = 4,
                 ffcv_dir: str | None = None, device: torch.device | None = None, pin_memory: bool = True) -> Splits:
    """``device``: where FFCV loaders deliver (on CUDA they copy to the GPU themselves); the
    ImageFolder loader pins its batches when ``device`` is CUDA and ``pin_memory`` is on."""
    spec = DATASETS[dataset]
    if ffcv_dir is not None:
        try:
            from .ffcv_batches import FFCVBatches, num_samples
        except ImportError as err:  # never a silent fallback: other loaders augment otherwise
            raise DataError(f"data.ffcv_dir is set but FFCV is not importable ({err}): install the ffcv "
                            "extra (scripts/setup.sh) or leave data.ffcv_dir unset") from None
        train_file, test_file = beton_files(ffcv_dir, dataset)
        train_idx, val_idx = split_indices(num_samples(str(train_file)), val_size)
        make = lambda path, idx, train: FFCVBatches(  # noqa: E731
            str(path), dataset, spec, batch_size, train=train, seed=seed, indices=idx, workers=loader_workers,
            device=device)
        test_idx = torch.arange(num_samples(str(test_file)))[:eval_n]
        return Splits(make(train_file, train_idx[:subset].numpy(), True), make(train_file, val_idx[:val_n].numpy(), False),
                      make(test_file, test_idx.numpy(), False), spec)
    if dataset == "imagenet":
        train_folder = imagenet_folder(data_dir, train=True)
        train_idx, val_idx = split_indices(len(train_folder), val_size)
        val_folder = imagenet_folder(data_dir, train=True)  # own copy: it gets the evaluation transform
        make = lambda folder, idx, train: FolderBatches(  # noqa: E731
            folder, idx.tolist(), batch_size, train=train, image_size=spec.image_size, workers=loader_workers, seed=seed,
            pin_memory=_pins(device, pin_memory))
        return Splits(make(train_folder, train_idx[:subset], True), make(val_folder, val_idx[:val_n], False),
                      build_test_split(dataset, data_dir=data_dir, batch_size=batch_size, eval_n=eval_n, seed=seed,
                                       loader_workers=loader_workers, device=device,
                                       pin_memory=pin_memory), spec)

    images, labels = IN_MEMORY[dataset](data_dir, train=True)
    train_idx, val_idx = split_indices(len(labels), val_size)
    train_idx, val_idx = train_idx[:subset], val_idx[:val_n]
    if len(train_idx) < batch_size:
        raise DataError(f"{len(train_idx)} training examples is fewer than one batch of {batch_size}")
    return Splits(
        TensorBatches(images[train_idx], labels[train_idx], batch_size, shuffle=True, drop_last=True,
                      seed=seed, augment=spec.augment),
        TensorBatches(images[val_idx], labels[val_idx], batch_size),
        build_test_split(dataset, data_dir=data_dir, batch_size=batch_size, eval_n=eval_n, seed=seed),
        spec,
    )


def build_test_split(dataset: str, *, data_dir: str | None, batch_size: int, eval_n: int | None, seed: int = 0,
                     loader_workers: int = 4, device: torch.device | None = None, pin_memory: bool = True) -> Sharded:
    """The first ``eval_n`` test examples (all: None), in order, from the data directory (not
    FFCV); nothing of the training set is read: an evaluation needs none of it (on ImageNet that
    saves a scan of 1.28M files)."""
    spec = DATASETS[dataset]
    if dataset == "imagenet":
        test_folder = imagenet_folder(data_dir, train=False)
        return FolderBatches(test_folder, list(range(len(test_folder)))[:eval_n], batch_size, train=False,
                             image_size=spec.image_size,
                             workers=loader_workers, seed=seed, pin_memory=_pins(device, pin_memory))
    test_images, test_labels = IN_MEMORY[dataset](data_dir, train=False)
    return TensorBatches(test_images[:eval_n], test_labels[:eval_n], batch_size)


def _pins(device: torch.device | None, pin_memory: bool) -> bool:
    """Whether the ImageFolder loader pins its batches: only for a CUDA device."""
    return pin_memory and device is not None and torch.device(device).type == "cuda"
