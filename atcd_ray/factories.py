"""What a run is built from, by its config: the seeded start, the device, the model, the
optimiser and the data splits."""
from __future__ import annotations

import random

import numpy as np
import torch

from .config import Config
from .core.models import build_model
from .data import DatasetSpec, build_splits


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # On the CPU nothing more is needed for bit-exact reruns (the crash and resume tests check them
    # every run): on the CPU torch.use_deterministic_algorithms only swaps indexed writes
    # (index_put, put_, index_copy and indexing's backward) for sorted ones, which differ only
    # where an index repeats, and no method indexes with repeats (ATCD's re-run rows are unique).
    # Runs with and without it end bit for bit alike; it would also import torch._inductor, 2.5 s
    # of every process's start (each Ray worker's). On a GPU, speed first.
    if device.type != "cpu":
        torch.backends.cudnn.benchmark = True


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_for(cfg: Config, spec: DatasetSpec) -> torch.nn.Module:
    return build_model(cfg.model, spec.num_classes, spec.in_channels, mean=spec.mean, std=spec.std)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.preserve_format


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_splits_of(cfg: Config, device: torch.device):
    """The data splits a config names, loaded for ``device``."""
    d = cfg.data
    return build_splits(cfg.dataset, data_dir=d.dir, batch_size=d.batch_size, val_size=d.val_size,
                        subset=d.subset, eval_n=cfg.eval.n, val_n=cfg.train.val_n, seed=cfg.seed,
                        loader_workers=d.loader_workers, ffcv_dir=d.ffcv_dir, device=device,
                        pin_memory=d.pin_memory)
