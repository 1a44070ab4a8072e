"""What every training method shares: the optimiser step and the method-state interface."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NoOptions:
    """A method without knobs of its own."""


class Method:
    """One adversarial-training method. ``step(x, y)`` trains on one minibatch and returns
    python floats for logging; ``state_dict`` holds what must survive a restart (a persistent
    perturbation, an HMC chain), per rank."""

    Options = NoOptions

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, eps: float, options):
        self.model, self.optimizer, self.eps, self.options = model, optimizer, eps, options

    def update(self, loss: torch.Tensor) -> None:
        """Stage 2 of every method: one optimiser step on ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def end_epoch(self, first_batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Called after each epoch; returning True stops training (Fast-FGSM's early stop)."""
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()
