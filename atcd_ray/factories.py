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
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
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
