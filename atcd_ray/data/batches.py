"""Batch iterators yielding (float images in [0, 1], labels): in-memory tensors and ImageFolder
trees here, FFCV's .beton files in ``ffcv_batches`` (imported only when a run asks for FFCV)."""
from __future__ import annotations

from typing import Iterator

import torch

from .sources import DataError


class Sharded:
    """What the batch iterators share: a seeded order per epoch, and a rank's shard of it.

    Training steps are global minibatches of ``batch_size`` consecutive examples of the epoch's
    order (one permutation for every number of ranks); ``shard(rank, world_size)`` gives rank r
    rows r, r + w, r + 2w, ... of each, so ranks differ by at most one row where w does not divide
    the batch. Step s is therefore the same examples whatever the number of workers, and a run
    resumed on another number of workers (an elastic resize) continues the same order: no example
    skipped or repeated. Evaluation splits take every w-th example (all of them, once)."""

    def __init__(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch, self.rank, self.world_size, self.start_batch = 0, 0, 1, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch``'s batches from ``start_batch`` on (a resume
        in the middle of an epoch); ``len`` stays the whole epoch's."""
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self, rank: int, world_size: int) -> None:
        if world_size > self.batch_size:
            raise DataError(f"{world_size} workers is more than the batch size {self.batch_size}: a worker would "
                            "train on no rows")
        self.rank, self.world_size = rank, world_size

    @property
    def local_batch_size(self) -> int:
        return len(range(self.rank, self.batch_size, self.world_size))

    @property
    def size(self) -> int:
        """Examples in the whole split (every rank's)."""
        raise NotImplementedError

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch."""
        n = self.size
        return n // self.batch_size * self.local_batch_size if self.drop_last else len(range(self.rank, n,
                                                                                              self.world_size))

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.num_examples // self.local_batch_size)

    def rows(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's examples of ``order`` (the whole split's), in the order it trains on them."""
        if not self.drop_last:
            return order[self.rank::self.world_size]
        steps = len(order) // self.batch_size
        by_step = order[:steps * self.batch_size].reshape(steps, self.batch_size)  # torch or numpy
        return by_step[:, self.rank::self.world_size].reshape(-1)

    def _order(self) -> tuple[torch.Tensor, torch.Generator]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = self.size
        order = self.rows(torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n))
        return order[self.start_batch * self.local_batch_size:len(self) * self.local_batch_size], gen


class TensorBatches(Sharded):
    """Minibatches from uint8 NCHW images held in memory; float [0, 1] on the way out."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, augment: str = "none"):
        super().__init__(batch_size, shuffle, drop_last, seed)
        self.images, self.labels, self.augment = images, labels, augment

    @property
    def size(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, _ = self._order()
        chunks = order.split(self.local_batch_size) if len(order) else ()  # split of nothing is one empty batch
        for batch, idx in enumerate(chunks, self.start_batch):
            x = self.images[idx].float().div_(255)
            if self.augment == "crop_flip":  # drawn per global batch: the same on a resume, on any number of ranks
                key = (self.seed * 100_003 + self.epoch) * 1_000_003 + batch
                x = random_crop_flip(x, torch.Generator().manual_seed(key % 2**63), batch_size=self.batch_size,
                                     rows=slice(self.rank, None, self.world_size))
            yield x, self.labels[idx]


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, *, batch_size: int | None = None,
                     rows: slice = slice(None), pad: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding=4) and RandomHorizontalFlip, per example, as the CIFAR-10 recipes.
    ``x`` is ``rows`` of a global batch of ``batch_size`` (default: all of it); the draws are the
    global batch's, so a row's crop does not depend on how the batch is split over ranks."""
    n, _, h, w = x.shape
    total = batch_size or n
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (total, 2), generator=gen)[rows]
    flips = (torch.rand(total, generator=gen) < 0.5)[rows]
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    out[flips] = out[flips].flip(-1)
    return out


class FolderBatches(Sharded):
    """ImageNet-style ImageFolder through a torch DataLoader (JPEG decoding needs worker processes)."""

    def __init__(self, folder, indices, batch_size: int, *, train: bool, image_size: int, workers: int, seed: int,
                 pin_memory: bool = False):
        import torchvision.transforms as T

        super().__init__(batch_size, shuffle=train, drop_last=train, seed=seed)
        if train:
            folder.transform = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
        else:
            folder.transform = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor()])
        self.folder, self.indices, self.workers, self.pin_memory = folder, list(indices), workers, pin_memory

    @property
    def size(self) -> int:
        return len(self.indices)

    def __iter__(self):
        order, gen = self._order()
        subset = torch.utils.data.Subset(self.folder, [self.indices[i] for i in order.tolist()])
        return iter(torch.utils.data.DataLoader(subset, self.local_batch_size, generator=gen, num_workers=self.workers,
                                                persistent_workers=False, pin_memory=self.pin_memory))
