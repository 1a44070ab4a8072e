"""Learning-rate schedules as pure functions of training progress, measured in epochs
(sweeps over the data, fractional within one), so that Free-m and ATCD, which replay each
minibatch, follow the same curve as a method that does not."""
from __future__ import annotations

import math
from typing import Sequence


def piecewise(lr: float, epoch: float, milestones: Sequence[float], gamma: float) -> float:
    """lr * gamma^(number of milestones passed): the step decay of Madry, TRADES and YOPO."""
    return lr * gamma ** sum(epoch >= m for m in milestones)


def cyclic(lr: float, epoch: float, total: float, peak_fraction: float) -> float:
    """The triangle of Wong et al. (Fast-FGSM): 0 -> lr at ``peak_fraction`` of training -> 0."""
    peak = peak_fraction * total
    return lr * (epoch / peak if epoch < peak else max(0.0, (total - epoch) / (total - peak)))


def cosine(lr: float, epoch: float, total: float) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * min(epoch / total, 1.0)))


def learning_rate(schedule: str, lr: float, epoch: float, total: float,
                  *, milestones: Sequence[float] = (), gamma: float = 0.1, peak_fraction: float = 0.4) -> float:
    if schedule == "constant":
        return lr
    if schedule == "piecewise":
        return piecewise(lr, epoch, milestones, gamma)
    if schedule == "cyclic":
        return cyclic(lr, epoch, total, peak_fraction)
    if schedule == "cosine":
        return cosine(lr, epoch, total)
    raise ValueError(f"unknown schedule {schedule!r}; allowed: constant, piecewise, cyclic, cosine")
