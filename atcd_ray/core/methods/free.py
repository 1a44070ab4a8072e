"""Free adversarial training, Free-m (Shafahi et al. 2019, "Adversarial training for free!").

Each minibatch is replayed m times; one backward gives both the weight gradient and the input
gradient, and the input gradient moves a perturbation that persists across replays and
minibatches. The recipe divides the epochs by m, so the number of passes matches natural training.

The official code applies the signed step right after the backward and clamps the *input* to
[0, 1]; here the step is kept pending and applied before the next forward, after the carried
perturbation is projected onto the new minibatch's eps-ball and [0, 1]. This order is what makes
ATCD with K=1, rho=0, no momentum and no M-H exactly Free-m (ALGORITHM.md, property 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..threat import project, uniform_start
from .base import Method, accuracy


@dataclass
class FreeOptions:
    replays: int = 4  # m
    init: str = "zero"  # first perturbation: "zero" (the official code) or "uniform"

    def validate(self):
        if self.replays < 1:
            raise ValueError("replays must be >= 1")
        if self.init not in ("zero", "uniform"):
            raise ValueError("init must be one of: zero, uniform")


class Free(Method):
    Options = FreeOptions
    per_example_state = ("delta", "pending_grad")

    def __init__(self, *args):
        super().__init__(*args)
        self.delta: torch.Tensor | None = None  # the persistent perturbation
        self.pending_grad: torch.Tensor | None = None  # input gradient of the last backward

    @staticmethod
    def passes(options):
        return options.replays  # each replay's one backward trains and attacks

    def step(self, x, y):
        delta = self._carry(x)
        for _ in range(self.options.replays):
            if self.pending_grad is not None:
                delta = project(delta + self.eps * self.pending_grad.sign(), x, self.eps)
            x_adv = (x + delta).requires_grad_(True)
            logits = self.loss_model(x_adv)
            loss = F.cross_entropy(logits, y)
            self.update(loss)  # the same backward fills x_adv.grad
            self.pending_grad = x_adv.grad.detach()
        self.delta = delta.detach()
        return {"loss": loss.detach(), "train_acc": accuracy(logits, y)}

    def _carry(self, x):
        if self.delta is None or self.delta.shape != x.shape:  # first batch, or a short last batch
            self.pending_grad = None
            return uniform_start(x, self.eps) if self.options.init == "uniform" else torch.zeros_like(x)
        return project(self.delta, x, self.eps)

    def state_dict(self):
        state = {"delta": self.delta, "pending_grad": self.pending_grad}
        return {k: v for k, v in state.items() if v is not None}

    def load_state_dict(self, state):
        self.delta, self.pending_grad = state.get("delta"), state.get("pending_grad")
