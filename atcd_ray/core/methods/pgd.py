"""PGD adversarial training (Madry et al. 2018): train on a K-step PGD adversary with random start."""
from __future__ import annotations

from dataclasses import dataclass

from ..attacks import pgd
from ..threat import default_step
from .base import Method


@dataclass
class PGDOptions:
    steps: int = 10
    alpha: float | None = None  # step size; None means eps/4 (2/255 at eps 8/255, as the paper)

    def validate(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


class PGDAT(Method):
    Options = PGDOptions

    @staticmethod
    def passes(options):
        return options.steps + 1  # k attack steps and the training pass

    def step(self, x, y):
        alpha = default_step(self.eps, self.options.alpha)
        x_adv = pgd(self.model, x, y, self.eps, alpha=alpha, steps=self.options.steps)
        return self.train_on(x_adv, y)
