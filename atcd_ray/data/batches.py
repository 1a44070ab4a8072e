"""Batch iterators yielding (float images in [0, 1], labels): in-memory tensors and ImageFolder
trees here, FFCV's .beton files in ``ffcv_batches`` (imported only when a run asks for FFCV)."""
from __future__ import annotations

from typing import Iterator

import torch

from .sources import DataError


class Sharded:
    """What the batch iterators share: a seeded order per epoch, and a rank's shard of it.

    ``shard(rank, world_size)`` gives rank r every world_size-th example of the epoch's order
    (one permutation for all ranks, so the shards are disjoint) and batches of
    ``batch_size // world_size``, so that the global minibatch stays ``batch_size``."""

    def __init__(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch, self.rank, self.world_size, self.start_batch = 0, 0, 1, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch``'s batches from ``start_batch`` on (a resume
        in the middle of an epoch); ``len`` stays the whole epoch's."""
        self.epoch, self.start_batch = epoch, start_batch

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
        return order[self.start_batch * self.local_batch_size:len(self) * self.local_batch_size], gen


class TensorBatches(Sharded):
    """Minibatches from uint8 NCHW images held in memory; float [0, 1] on the way out."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, augment: str = "none"):
        super().__init__(batch_size, shuffle, drop_last, seed)
        self.images, self.labels, self.augment = images, labels, augment

    def _size(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, _ = self._order()
        chunks = order.split(self.local_batch_size) if len(order) else ()  # split of nothing is one empty batch
        for batch, idx in enumerate(chunks, self.start_batch):
            x = self.images[idx].float().div_(255)
            if self.augment == "crop_flip":  # seeded per batch, so a resume mid-epoch draws the same
                key = ((self.seed * 100_003 + self.epoch) * 1_000_003 + batch) * 1_009 + self.rank
                x = random_crop_flip(x, torch.Generator().manual_seed(key % 2**63))
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
