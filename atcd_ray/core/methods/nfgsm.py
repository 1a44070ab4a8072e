"""N-FGSM (de Jorge et al. 2022, "Make some noise: reliable and efficient single-step adversarial
training"), the single-step method fast adversarial training reaches for since.

A uniform start in a larger ball, k * eps (k = 2), one signed-gradient step of alpha_factor * eps
(1), and, unlike Fast-FGSM, no projection back to the eps-ball: the training input may lie up to
(k + alpha_factor) * eps from x, only clipped to the image box [0, 1]. The noise, not the
projection, is what keeps single-step training from catastrophic overfitting, so no early stop.
``clip`` projects onto the eps-ball after all (the paper's ablation; off in its method).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attacks import input_grad
from ..threat import project
from .base import Method


@dataclass
class NFGSMOptions:
    k: float = 2.0  # the noise's radius, in eps
    alpha_factor: float = 1.0  # the step, in eps
    clip: bool = False  # project the training input back onto the eps-ball

    def validate(self):
        if self.k < 0:
            raise ValueError("k must be >= 0")
        if self.alpha_factor <= 0:
            raise ValueError("alpha_factor must be > 0")


class NFGSM(Method):
    Options = NFGSMOptions

    @staticmethod
    def passes(options):
        return 2  # the FGSM step and the training pass

    def step(self, x, y):
        o = self.options
        noise = torch.empty_like(x).uniform_(-o.k * self.eps, o.k * self.eps)
        x_noisy = (x + noise).clamp(0.0, 1.0)
        grad, _ = input_grad(self.model, x_noisy, y)
        delta = x_noisy - x + o.alpha_factor * self.eps * grad.sign()
        x_adv = x + project(delta, x, self.eps) if o.clip else (x + delta).clamp(0.0, 1.0)
        return self.train_on(x_adv, y)
