"""FFCV loaders with the augmentations of the paper's setup, behind the ``Sharded`` interface.

CIFAR-10 training: random crop (4 pixels of padding) and horizontal flip; ImageNet training:
random-resized-crop decode and flip; ImageNet evaluation: centre crop (224/256). The 28x28
datasets: none. ``distributed=True`` inside Ray Train workers (each rank its own shard); the
order is seeded by (seed, epoch), so a resumed run continues the same sequence.
"""
from __future__ import annotations

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder, \
    SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

from ..data import DatasetSpec, Sharded


def image_pipeline(dataset: str, spec: DatasetSpec, train: bool, device: torch.device | None = None) -> list:
    """Decode and augment on the CPU; on CUDA, copy the uint8 batch to the GPU without blocking
    (a quarter of a float copy) and hand it out channels-last (FFCV's ToTorchImage default)."""
    size = spec.image_size
    if dataset == "imagenet":
        decode = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()] if train else \
            [CenterCropRGBImageDecoder((size, size), ratio=224 / 256)]
    elif spec.in_channels == 3:
        augment = [RandomHorizontalFlip(), RandomTranslate(padding=4, fill=(0, 0, 0))] if train else []
        decode = [SimpleRGBImageDecoder(), *augment]
    else:
        decode = [NDArrayDecoder()]
    return [*decode, ToTensor(), *_to_device(device), ToTorchImage(channels_last=True)]


def _to_device(device: torch.device | None) -> list:
    return [ToDevice(device, non_blocking=True)] if device is not None and device.type == "cuda" else []


class FFCVBatches(Sharded):
    """Batches of one .beton file (optionally a subset of its indices), float [0, 1] NCHW."""

    def __init__(self, path: str, dataset: str, spec: DatasetSpec, batch_size: int, train: bool, seed: int,
                 indices=None, workers: int = 4, device: torch.device | None = None):
        super().__init__(batch_size, shuffle=train, drop_last=train, seed=seed)
        self.path, self.dataset, self.spec, self.workers, self.device = path, dataset, spec, workers, device
        self.indices = np.arange(num_samples(path)) if indices is None else np.asarray(indices, dtype=np.int64)
        self._loader: Loader | None = None

    def _size(self) -> int:
        return len(self.indices)

    def shard(self, rank: int, world_size: int) -> None:
        super().shard(rank, world_size)
        self._loader = None

    def _make(self) -> Loader:
        if self._loader is None:
            # Training shards through FFCV's distributed sampler (seeded, reshuffled per epoch);
            # evaluation takes every world_size-th example, so that no example counts twice.
            distributed = self.shuffle and self.world_size > 1
            indices = self.indices if self.shuffle else self.indices[self.rank::self.world_size]
            self._loader = Loader(
                self.path, batch_size=self.local_batch_size, num_workers=self.workers,
                order=OrderOption.RANDOM if self.shuffle else OrderOption.SEQUENTIAL, drop_last=self.drop_last,
                distributed=distributed, seed=self.seed, indices=indices,
                pipelines={"image": image_pipeline(self.dataset, self.spec, self.shuffle, self.device),
                           "label": [IntDecoder(), ToTensor(), Squeeze(), *_to_device(self.device)]})
        return self._loader

    def __len__(self) -> int:
        return len(self._make())

    def __iter__(self):
        loader = self._make()
        loader.next_epoch = self.epoch  # the order of (seed, epoch), also after a resume
        for images, labels in loader:
            # FFCV reuses its output buffers for later batches: hand out copies, never views.
            yield images.float().div_(255), labels.view(-1).to(torch.long, copy=True)


def num_samples(path: str) -> int:
    from ffcv.reader import Reader

    return int(Reader(path).num_samples)
