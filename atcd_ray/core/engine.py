"""The one train/evaluate engine every method goes through."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .attacks import Attack
from .methods import Method


def autocast(enabled: bool, device: torch.device):
    """bfloat16 autocast (no gradient scaler needed), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_epoch(method: Method, batches, epoch: int, total_epochs: int, set_lr: Callable[[float], float],
                device: torch.device, amp: bool = False, progress: bool = True) -> dict[str, float]:
    """One pass over ``batches``; the learning rate follows fractional epochs. Returns means of
    the method's per-step floats plus throughput."""
    method.model.train()
    batches.set_epoch(epoch)
    totals: dict[str, float] = {}
    steps, images, start = 0, 0, time.perf_counter()
    wait = 0.0
    n = len(batches)
    t_fetch = time.perf_counter()
    for i, (x, y) in enumerate(_progress(batches, n, f"epoch {epoch + 1}/{total_epochs}", progress)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        wait += time.perf_counter() - t_fetch
        lr = set_lr(epoch + i / n)
        with autocast(amp, device):
            stats = method.step(x, y)
        for key, value in {**stats, "lr": lr}.items():
            totals[key] = totals.get(key, 0.0) + value
        steps, images = steps + 1, images + len(y)
        t_fetch = time.perf_counter()
    seconds = time.perf_counter() - start
    out = {key: value / max(steps, 1) for key, value in totals.items()}
    out.update(epoch_seconds=seconds, images_per_second=images / seconds, data_wait_fraction=wait / seconds)
    return out


def evaluate(model: nn.Module, batches: Iterable, attacks: Mapping[str, Attack], device: torch.device,
             amp: bool = False, progress: bool = False) -> dict[str, float]:
    """Clean accuracy and accuracy under each attack, in eval mode (restored afterwards).

    Every attack runs on every example (not only those still correct), so each column is a
    plain accuracy that can be compared with the others."""
    was_training = model.training
    model.eval()
    correct = {"clean": 0, **{name: 0 for name in attacks}}
    total = 0
    try:
        for x, y in _progress(batches, len(batches), "evaluate", progress):
            x, y = x.to(device), y.to(device)
            with autocast(amp, device):
                with torch.no_grad():
                    correct["clean"] += (model(x).argmax(1) == y).sum().item()
                for name, attack in attacks.items():
                    x_adv = attack(model, x, y)
                    with torch.no_grad():
                        correct[name] += (model(x_adv).argmax(1) == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    return {name: count / max(total, 1) for name, count in correct.items()}
