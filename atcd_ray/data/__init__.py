"""Datasets: a registry of what each dataset is, and batch iterators yielding float inputs in [0, 1].

The training set is split once, by a fixed permutation independent of the run seed, into a
held-out validation part (for best-checkpoint selection) and the training part; ``subset`` then
keeps the first N training examples. Shuffling is seeded per epoch, so a run, and a resumed run,
sees the same sequence of minibatches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from .sources import IN_MEMORY, DataError, beton_files, imagenet_folder

__all__ = ["DATASETS", "DatasetSpec", "DataError", "Sharded", "Splits", "TensorBatches", "build_splits"]


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None  # normalisation inside the model; None = identity
    std: tuple[float, ...] | None
    default_recipe: str
    augment: str = "none"  # "crop_flip" for CIFAR-10; ImageNet uses torchvision transforms


DATASETS = {
    "fashion-mnist": DatasetSpec(10, 1, 28, None, None, "fashion-mnist_smallcnn.yaml"),
    "mnist": DatasetSpec(10, 1, 28, None, None, "mnist_smallcnn.yaml"),
    "digits": DatasetSpec(10, 1, 28, None, None, "digits_smallcnn.yaml"),
    "cifar10": DatasetSpec(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
                           "cifar10_preactresnet18.yaml", augment="crop_flip"),
    "imagenet": DatasetSpec(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet_resnet50.yaml"),
}

SPLIT_SEED = 20201011  # fixed: the validation split must not move with the run seed


class Sharded:
    """What the batch iterators share: a seeded order per epoch, and a rank's shard of it.

    ``shard(rank, world_size)`` gives rank r every world_size-th example of the epoch's order
    (one permutation for all ranks, so the shards are disjoint) and batches of
    ``batch_size // world_size``, so that the global minibatch stays ``batch_size``."""

    def __init__(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch, self.rank, self.world_size = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> None:
        if self.batch_size % world_size:
            raise DataError(f"batch_size {self.batch_size} is not divisible by {world_size} workers")
        self.rank, self.world_size = rank, world_size

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _size(self) -> int:
        raise NotImplementedError

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch."""
        n, w = self._size(), self.world_size
        return n // w if self.drop_last else len(range(self.rank, n, w))

    def __len__(self) -> int:
        n, b = self.num_examples, self.local_batch_size
        return n // b if self.drop_last else -(-n // b)

    def _order(self) -> tuple[torch.Tensor, torch.Generator]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n, w = self._size(), self.world_size
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        stop = n // w * w if self.drop_last else n  # equal shards when training
        order = order[self.rank:stop:w]
        return order[:len(self) * self.local_batch_size], gen


class TensorBatches(Sharded):
    """Minibatches from uint8 NCHW images held in memory; float [0, 1] on the way out."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, augment: str = "none"):
        super().__init__(batch_size, shuffle, drop_last, seed)
        self.images, self.labels, self.augment = images, labels, augment

    def _size(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, gen = self._order()
        for idx in order.split(self.local_batch_size):
            x = self.images[idx].float().div_(255)
            if self.augment == "crop_flip":
                x = random_crop_flip(x, gen)
            yield x, self.labels[idx]


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding=4) and RandomHorizontalFlip, per example, as the CIFAR-10 recipes."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    out[flips] = out[flips].flip(-1)
    return out


class FolderBatches(Sharded):
    """ImageNet-style ImageFolder through a torch DataLoader (JPEG decoding needs worker processes)."""

    def __init__(self, folder, indices, batch_size: int, train: bool, image_size: int, workers: int, seed: int,
                 pin_memory: bool = False):
        import torchvision.transforms as T

        super().__init__(batch_size, shuffle=train, drop_last=train, seed=seed)
        if train:
            folder.transform = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
        else:
            folder.transform = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor()])
        self.folder, self.indices, self.workers, self.pin_memory = folder, list(indices), workers, pin_memory

    def _size(self) -> int:
        return len(self.indices)

    def __iter__(self):
        order, gen = self._order()
        subset = torch.utils.data.Subset(self.folder, [self.indices[i] for i in order.tolist()])
        return iter(torch.utils.data.DataLoader(subset, self.local_batch_size, generator=gen, num_workers=self.workers,
                                                persistent_workers=False, pin_memory=self.pin_memory))


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


def build_splits(dataset: str, data_dir: str | None, batch_size: int, val_size: int, subset: int | None,
                 eval_n: int | None, val_n: int | None, seed: int, loader_workers: int = 4,
                 ffcv_dir: str | None = None, device: torch.device | None = None, pin_memory: bool = True) -> Splits:
    """``device``: where FFCV loaders deliver (on CUDA they copy to the GPU themselves); the
    ImageFolder loader pins its batches when ``device`` is CUDA and ``pin_memory`` is on."""
    spec = DATASETS[dataset]
    if ffcv_dir is not None:
        try:
            from ..pipelines.loaders import FFCVBatches, num_samples
        except ImportError as err:
            logging.getLogger("atcd_ray").warning(
                "data.ffcv_dir is set but FFCV is not importable (%s): using the torchvision loaders", err)
        else:
            train_file, test_file = beton_files(ffcv_dir, dataset)
            train_idx, val_idx = split_indices(num_samples(str(train_file)), val_size)
            make = lambda path, idx, train: FFCVBatches(  # noqa: E731
                str(path), dataset, spec, batch_size, train, seed, idx, loader_workers, device)
            test_idx = torch.arange(num_samples(str(test_file)))[:eval_n]
            return Splits(make(train_file, train_idx[:subset].numpy(), True), make(train_file, val_idx[:val_n].numpy(), False),
                          make(test_file, test_idx.numpy(), False), spec)
    if dataset == "imagenet":
        train_folder = imagenet_folder(data_dir, train=True)
        train_idx, val_idx = split_indices(len(train_folder), val_size)
        val_folder = imagenet_folder(data_dir, train=True)  # own copy: it gets the evaluation transform
        test_folder = imagenet_folder(data_dir, train=False)
        test_idx = torch.arange(len(test_folder))
        make = lambda folder, idx, train: FolderBatches(  # noqa: E731
            folder, idx.tolist(), batch_size, train, spec.image_size, loader_workers, seed,
            pin_memory=pin_memory and device is not None and torch.device(device).type == "cuda")
        return Splits(make(train_folder, train_idx[:subset], True), make(val_folder, val_idx[:val_n], False),
                      make(test_folder, test_idx[:eval_n], False), spec)

    images, labels = IN_MEMORY[dataset](data_dir, train=True)
    test_images, test_labels = IN_MEMORY[dataset](data_dir, train=False)
    train_idx, val_idx = split_indices(len(labels), val_size)
    train_idx, val_idx = train_idx[:subset], val_idx[:val_n]
    if len(train_idx) < batch_size:
        raise DataError(f"{len(train_idx)} training examples is fewer than one batch of {batch_size}")
    return Splits(
        TensorBatches(images[train_idx], labels[train_idx], batch_size, shuffle=True, drop_last=True,
                      seed=seed, augment=spec.augment),
        TensorBatches(images[val_idx], labels[val_idx], batch_size),
        TensorBatches(test_images[:eval_n], test_labels[:eval_n], batch_size),
        spec,
    )
