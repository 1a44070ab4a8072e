"""What every training method shares: the optimiser step, the cross-entropy training pass and the
method-state interface."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class NoOptions:
    """A method without knobs of its own."""


class Method:
    """One adversarial-training method. ``step(x, y)`` trains on one minibatch and returns
    device tensors for logging; ``state_dict`` holds what must survive a restart (a persistent
    perturbation, an HMC chain), per rank.

    ``model`` may be a DistributedDataParallel wrapper. Only the forward whose output is the
    training loss goes through it (``self.loss_model``), so that only that backward all-reduces
    the weight gradients; attacks and trajectory steps use the bare module (``self.model``),
    whose backwards stay local to the rank."""

    Options = NoOptions
    # State entries that hold one row per example of this rank's minibatch (a persistent
    # perturbation, a chain): an elastic resize re-cuts them by rows over the new ranks.
    per_example_state: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, eps: float, options):
        self.loss_model = model
        self.model = model.module if isinstance(model, DistributedDataParallel) else model
        self.optimizer, self.eps, self.options = optimizer, eps, options
        # This rank's rows of the global minibatch, times the number of ranks: 1 unless the ranks'
        # shares differ (a batch that the workers do not divide), where gradients are averaged
        # with these weights so that every example weighs the same (``weighted_mean_hook``).
        self.rank_weight = 1.0

    def update(self, loss: torch.Tensor) -> None:
        """Stage 2 of every method: one optimiser step on ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def train_on(self, x_train: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on cross-entropy at ``x_train`` (through DDP): the training pass of
        every method that differs from the others only in the inputs it trains on."""
        logits = self.loss_model(x_train)
        loss = F.cross_entropy(logits, y)
        self.update(loss)
        return {"loss": loss.detach(), "train_acc": accuracy(logits, y)}

    def average_gradients(self) -> None:
        """All-reduce (mean) the gradients accumulated on ``self.model``, for a method whose weight
        gradient is not the backward of one forward through ``loss_model`` (YOPO)."""
        if self.loss_model is self.model or not dist.is_initialized():
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        if self.rank_weight != 1.0:
            flat *= self.rank_weight
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    @staticmethod
    def passes(options) -> int:
        """Forward and backward passes through the whole network per minibatch: the unit in which
        budgets are counted (one natural-epoch equivalent = one pass per minibatch of an epoch)."""
        return 1

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train on one minibatch; returns 0-dim tensors on the device for logging, read by the
        engine once per logging interval: a step never waits for the GPU."""
        raise NotImplementedError

    def end_epoch(self, first_batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Called after each epoch; returning True stops training (Fast-FGSM's early stop)."""
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def weighted_mean_hook(rank_weight, bucket):  # unannotated: DDP refuses a string annotation of bucket
    """DDP communication hook: the all-reduced mean of the ranks' gradients, each weighted by its
    ``rank_weight`` (``Method.rank_weight``), for ranks that hold different numbers of rows."""
    tensor = bucket.buffer().mul_(rank_weight / dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda done: done.value()[0])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of rows classified correctly, as a 0-dim tensor on the logits' device."""
    return (logits.detach().argmax(1) == y).float().mean()
