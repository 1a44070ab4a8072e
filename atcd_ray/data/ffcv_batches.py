"""FFCV loaders with the augmentations of the paper's setup, behind the ``Sharded`` interface.
The one module of ``atcd_ray.data`` that imports FFCV; ``build_splits`` imports it only when a
run sets ``data.ffcv_dir``. The .beton writer is ``atcd_ray.write_ffcv``.

CIFAR-10 training: random crop (4 pixels of padding) and horizontal flip; ImageNet training:
random-resized-crop decode and flip; ImageNet evaluation: centre crop (224/256). The 28x28
datasets: none. The training order is FFCV's, seeded by (seed, epoch) and the same for any
number of Ray Train workers, each of which takes its rows of every global batch
(``Sharded.rows``): a resumed run, also on another number of workers, continues the same sequence.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    NDArrayDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import (
    RandomHorizontalFlip,
    RandomTranslate,
    Squeeze,
    ToDevice,
    ToTensor,
    ToTorchImage,
)
from ffcv.types import ALLOC_TABLE_TYPE

from .batches import Sharded
from .sources import DataError

if TYPE_CHECKING:
    from . import DatasetSpec


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

    def __init__(self, path: str, dataset: str, spec: DatasetSpec, batch_size: int, *, train: bool, seed: int,
                 indices=None, workers: int = 4, device: torch.device | None = None):
        super().__init__(batch_size, shuffle=train, drop_last=train, seed=seed)
        self.path, self.dataset, self.spec, self.workers, self.device = path, dataset, spec, workers, device
        n = num_samples(path)  # also checks the file is whole
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) and not 0 <= self.indices.min() <= self.indices.max() < n:
            raise DataError(f"{path} has {n} samples; indices up to {self.indices.max()} were asked for")
        self._loader: Loader | None = None

    @property
    def size(self) -> int:
        return len(self.indices)

    def shard(self, rank: int, world_size: int) -> None:
        super().shard(rank, world_size)
        self._loader = None

    def _make(self) -> Loader:
        if self._loader is None:
            # Training: FFCV's seeded order of the whole split (the same for any number of ranks),
            # of which this rank takes its rows of each global batch (``Sharded.rows``).
            # Evaluation takes every world_size-th example, so that no example counts twice.
            indices = self.indices if self.shuffle else self.indices[self.rank::self.world_size]
            self._loader = CheckedLoader(
                self.path, batch_size=self.local_batch_size, num_workers=self.workers,
                order=OrderOption.RANDOM if self.shuffle else OrderOption.SEQUENTIAL, drop_last=self.drop_last,
                seed=self.seed, indices=indices,
                pipelines={"image": image_pipeline(self.dataset, self.spec, self.shuffle, self.device),
                           "label": [IntDecoder(), ToTensor(), Squeeze(), *_to_device(self.device)]})
            self._loader.rows = self.rows if self.shuffle else None
        return self._loader

    def __iter__(self):
        loader = self._make()
        loader.next_epoch = self.epoch  # the order of (seed, epoch), also after a resume
        loader.start_batch = self.start_batch
        for images, labels in loader:
            # FFCV reuses its output buffers for later batches: hand out copies, never views.
            yield images.float().div_(255), labels.view(-1).to(torch.long, copy=True)


def open_beton(path: str) -> Reader:
    """FFCV's reader of ``path``, checked whole: a truncated or corrupt file is one DataError
    naming it (FFCV would read past its end inside a loader thread, or fail with its raw error)."""
    try:
        reader = Reader(path)
    except Exception as err:  # noqa: BLE001 - whatever FFCV raises on a file that is not a .beton
        raise DataError(f"{path}: not a readable FFCV .beton file ({type(err).__name__}: {err})") from None
    size = os.path.getsize(path)
    table = reader.alloc_table
    end = int((table["ptr"] + table["size"]).max()) if len(table) else 0
    alloc_end = int(reader.header["alloc_table_ptr"]) + len(table) * ALLOC_TABLE_TYPE.itemsize
    if len(reader.metadata) != reader.num_samples or (reader.num_samples and not len(table)) \
            or end > size or alloc_end != size:
        raise DataError(f"{path}: truncated or corrupt FFCV .beton file ({size} bytes; its tables reach "
                        f"{max(end, alloc_end)} bytes, {len(reader.metadata)} of {reader.num_samples} samples listed)")
    return reader


def num_samples(path: str) -> int:
    """Samples in the checked file; a run asks for each file up to three times (its splits), and
    ImageNet's tables are tens of MB: read once per version of the file."""
    try:
        stat = os.stat(path)
    except OSError:
        return int(open_beton(path).num_samples)  # its DataError names the file
    return _checked_num_samples(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _checked_num_samples(path: str, size: int, mtime_ns: int) -> int:
    return int(open_beton(path).num_samples)


class CheckedEpochIterator(EpochIterator):
    """FFCV's epoch thread, except that an exception inside it reaches the consumer: FFCV's own
    thread dies with it and leaves the consumer waiting on the batch queue for ever."""

    FAILED = object()

    def run(self):
        try:
            super().run()
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
            self.error = err
            self.output_queue.put(self.FAILED)

    def __next__(self):
        item = self.output_queue.get()
        if item is self.FAILED:
            self.close()
            raise DataError(f"{self.loader.reader.file_name}: FFCV loader failed "
                            f"({type(self.error).__name__}: {self.error})") from self.error
        if item is None:
            self.close()
            raise StopIteration
        slot, result = item
        if self.cuda_streams[slot] is not None:
            self.current_stream.wait_stream(self.cuda_streams[slot])  # the batch's copy is done
        return result


class CheckedLoader(Loader):
    """FFCV's Loader with ``CheckedEpochIterator`` (the same steps as ``Loader.__iter__``), from
    batch ``start_batch`` of the epoch's order on; ``rows`` picks this rank's part of the order."""

    start_batch = 0
    rows = None

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        if self.rows is not None:
            order = self.rows(order)
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        stop = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
        return CheckedEpochIterator(self, order[self.start_batch * self.batch_size:stop])
