"""The one train/evaluate engine every method goes through."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .attacks import Attack
from .methods import Method

log = logging.getLogger("atcd_ray")


def autocast(enabled: bool, device: torch.device):
    """bfloat16 autocast (no gradient scaler needed), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, *, channels_last: bool = False,
              pin_memory: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A host batch on ``device``: on CUDA through page-locked memory with non-blocking copies,
    so the copy overlaps the GPU's work; images channels-last when asked (tensor cores' layout)."""
    if device.type == "cuda" and pin_memory and not x.is_cuda:
        x, y = x.pin_memory(), y.pin_memory()
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or weight; the message names where and what."""


class FiniteLossGuard:
    """Stops an epoch at a non-finite loss, naming the first step that had one. The check stays on
    the device: on CUDA the flag is read every ``interval`` seconds (reading it each step would
    make the step wait for the GPU), on the CPU at once (a read costs nothing there)."""

    def __init__(self, epoch: int, device: torch.device, interval: float):
        self.epoch, self.interval = epoch, interval if device.type == "cuda" else 0.0
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.value = torch.zeros((), device=device)
        self.last = time.perf_counter()

    def update(self, step: int, loss: torch.Tensor) -> None:
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.value = torch.where(new, loss.detach().float(), self.value)
        if time.perf_counter() - self.last >= self.interval:
            self.check()

    def check(self) -> None:
        self.last = time.perf_counter()
        step = int(self.first_step)
        if step >= 0:
            raise NonFiniteError(f"non-finite training loss ({self.value.item()}) at epoch {self.epoch + 1}, "
                                 f"step {step}")


class Progress:
    """What a user sees during an epoch: a tqdm bar on a terminal, otherwise (a Ray worker, a log
    file) one log line every ``interval`` seconds, with images/s and the epoch's ETA. Reading the
    device-side statistics for it is the only host synchronisation of the loop, once a line."""

    def __init__(self, total: int, desc: str, *, enabled: bool, interval: float = 5.0, world_size: int = 1):
        self.total, self.desc, self.interval, self.world_size = total, desc, interval, world_size
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, unit="batch")

    def update(self, steps: int, images: int, totals: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        if now - self.last < self.interval or steps == self.total:
            return
        self.last = now
        rate = images * self.world_size / (now - self.start)
        eta = (now - self.start) / steps * (self.total - steps)
        loss = f"loss {totals['loss'].item() / steps:.4g}  " if "loss" in totals else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{loss}{rate:.0f} images/s")
        else:
            log.info("%s  step %d/%d  %s%.0f images/s  ETA %s", self.desc, steps, self.total, loss, rate, _clock(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


@dataclasses.dataclass
class EpochProgress:
    """How far an epoch has got: what a mid-epoch checkpoint keeps so that the epoch continues
    where it stopped, with the same statistics (sums as float32 values, exact in JSON)."""

    steps: int = 0
    images: int = 0
    lr_sum: float = 0.0
    wait: float = 0.0
    seconds: float = 0.0
    totals: dict[str, float] = dataclasses.field(default_factory=dict)
    # Which steps ran on how many ranks: [first step, world size] per stretch (an elastic resize
    # starts one); kept by the trainer, not read here.
    stretches: list[list[int]] = dataclasses.field(default_factory=list)


class EMA(AveragedModel):
    """An exponential moving average of a model's weights (``train.ema``): torch's
    ``AveragedModel`` with its EMA averaging function (``get_ema_multi_avg_fn(decay)``) and
    ``use_buffers=True``, so that BatchNorm's running statistics are averaged like the weights, as
    PyTorch documents for EMA (no ``update_bn`` pass is needed). ``follow(optimizer, model)``
    updates it after every step of ``optimizer``: the methods that step several times a minibatch
    (Free-m's replays, ATCD's, YOPO's) average every step, as the weights move.

    ``update_parameters`` does what the library's does, without its host synchronisations: the
    counter ``n_averaged`` stays on the CPU (keep this module off ``.to``; its copy of the model,
    ``module``, is on the model's device), so an update queued after a GPU step never waits for
    the GPU. tests/test_ema.py checks that the two give the same bits."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        if len(averaged) != len(current):
            raise ValueError(f"EMA of a model with {len(averaged)} tensors updated from one with {len(current)}")
        if int(self.n_averaged) == 0:  # the first update copies (n_averaged is on the CPU: no sync)
            for mine, theirs in zip(averaged, current):
                mine.detach().copy_(theirs.detach())
        else:  # the library's averaging function, per device and dtype (_foreach_lerp_ on floats)
            groups: dict[tuple, tuple[list, list]] = {}
            for mine, theirs in zip(averaged, current):
                pair = groups.setdefault((mine.device, mine.dtype), ([], []))
                pair[0].append(mine.detach())
                pair[1].append(theirs.detach().to(mine.device))
            for mine, theirs in groups.values():
                self.multi_avg_fn(mine, theirs, self.n_averaged)
        self.n_averaged += 1

    def follow(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """Update from ``model`` after every ``optimizer.step()``; returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update_parameters(model))


def train_epoch(method: Method, batches, *, epoch: int, total_epochs: int, set_lr: Callable[[float], float],
                device: torch.device, amp: bool = False, progress: bool = True, channels_last: bool = False,
                pin_memory: bool = True, world_size: int = 1, progress_interval: float = 5.0,
                resumed: EpochProgress | None = None, checkpoint_steps: int | None = None,
                checkpoint: Callable[[EpochProgress], None] | None = None,
                checkpoint_now: Callable[[int], bool] | None = None, max_steps: int | None = None) -> dict[str, float]:
    """One epoch over ``batches`` (its first ``max_steps`` batches, if given: the part of a last
    epoch a budget pays for); the learning rate follows fractional epochs. Returns means of
    the method's per-step statistics plus throughput. The statistics stay on the device until
    read (by the progress line, and at the end of the epoch). A non-finite loss raises
    ``NonFiniteError`` (``FiniteLossGuard``). ``resumed``: the part of this epoch a mid-epoch
    checkpoint holds (the epoch continues after it); ``checkpoint(progress)`` is called every
    ``checkpoint_steps`` steps before the epoch's last."""
    method.model.train()
    resumed = resumed or EpochProgress()
    batches.set_epoch(epoch, start_batch=resumed.steps)
    per_epoch = len(batches)  # the schedule's unit, even in an epoch that stops part-way
    n = per_epoch if max_steps is None else min(per_epoch, max_steps)
    report = Progress(n, f"epoch {epoch + 1}/{math.ceil(total_epochs)}", enabled=progress, interval=progress_interval,
                      world_size=world_size)
    guard = FiniteLossGuard(epoch, device, progress_interval)
    totals = {key: torch.tensor(value, device=device) for key, value in resumed.totals.items()}
    steps, images, lr_sum, wait = resumed.steps, resumed.images, resumed.lr_sum, resumed.wait
    start, t_fetch = time.perf_counter() - resumed.seconds, time.perf_counter()
    for i, (x, y) in enumerate(batches, resumed.steps):
        if i >= n:
            break
        x, y = to_device(x, y, device, channels_last=channels_last, pin_memory=pin_memory)
        wait += time.perf_counter() - t_fetch
        lr_sum += set_lr(epoch + i / per_epoch)
        with autocast(amp, device):
            stats = method.step(x, y)
        for key, value in stats.items():
            totals[key] = totals[key] + value if key in totals else value.detach().float()
        steps, images = steps + 1, images + len(y)
        guard.update(steps, stats["loss"])
        report.update(steps, images, totals)
        # Asked at the same steps on every rank (a collective under Ray); not at the last step,
        # where the epoch's own checkpoint follows.
        asked = steps < n and checkpoint_now is not None and checkpoint_now(steps)
        if steps < n and (asked or (checkpoint_steps and steps % checkpoint_steps == 0)):
            guard.check()  # never checkpoint a step past a non-finite loss
            checkpoint(EpochProgress(steps=steps, images=images, lr_sum=lr_sum, wait=wait,
                                     seconds=time.perf_counter() - start,
                                     totals={key: total.item() for key, total in totals.items()}))
        t_fetch = time.perf_counter()
    report.close()
    guard.check()
    seconds = time.perf_counter() - start
    names = list(totals)
    means = (torch.stack([totals[k] for k in names]) / max(steps, 1)).tolist() if names else []
    out = dict(zip(names, means), lr=lr_sum / max(steps, 1))
    out.update(epoch_seconds=seconds, images_per_second=images / seconds, data_wait_fraction=wait / seconds)
    return out


def correct_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Attack],
                        *, amp: bool = False, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Which examples of one batch the model classifies correctly, clean and under each attack
    (boolean per example, on the batch's device). The model is used as the caller set it.
    ``seed``: each attack starts from torch's generator seeded with it, so its draws do not depend
    on the attacks before it (some libraries reseed the global generator) nor on its name's spelling."""
    with autocast(amp, x.device):
        with torch.no_grad():
            correct = {"clean": model(x).argmax(1) == y}
        for name, attack in attacks.items():
            if seed is not None:
                torch.manual_seed(seed)
            x_adv = attack(model, x, y)
            with torch.no_grad():
                correct[name] = model(x_adv).argmax(1) == y
    return correct


def evaluate(model: nn.Module, batches: Iterable, attacks: Mapping[str, Attack], device: torch.device, *,
             amp: bool = False, progress: bool = False, channels_last: bool = False) -> dict[str, float]:
    """Clean accuracy and accuracy under each attack, in eval mode (restored afterwards).

    Every attack runs on every example (not only those still correct), so each column is a
    plain accuracy that can be compared with the others. ``amp``: the attacks too run in bfloat16
    (the recipes keep evaluation in float32 unless asked)."""
    was_training = model.training
    model.eval()
    correct = {"clean": torch.zeros((), device=device), **{name: torch.zeros((), device=device) for name in attacks}}
    total = 0
    report = Progress(len(batches), "evaluate", enabled=progress)
    try:
        for step, (x, y) in enumerate(batches, 1):
            x, y = to_device(x, y, device, channels_last=channels_last)
            for name, hits in correct_per_example(model, x, y, attacks, amp=amp).items():
                correct[name] += hits.sum()
            total += len(y)
            report.update(step, total, {})
    finally:
        model.train(was_training)
        report.close()
    return {name: count.item() / max(total, 1) for name, count in correct.items()}
