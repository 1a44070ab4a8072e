"""TRADES (Zhang et al. 2019, "Theoretically principled trade-off between robustness and accuracy").

    min_w  CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x'))
    x' = argmax_{|x' - x| <= eps} KL(softmax f(x) || softmax f(x'))

The inner maximisation is sign-gradient ascent on the KL from x + 0.001 * N(0, I), with the model
in eval mode, as the official code; beta = 6 for CIFAR-10 and 1 for MNIST.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import kl_to
from ..threat import default_step, project
from .base import Method, accuracy


@dataclass
class TRADESOptions:
    beta: float = 6.0
    steps: int = 10
    alpha: float | None = None  # step size; None means eps/4 (the official 0.007 at eps 0.031)

    def validate(self):
        if self.steps < 1 or self.beta < 0:
            raise ValueError("need steps >= 1 and beta >= 0")


def trades_adversary(model, x, eps, *, alpha, steps):
    """x' maximising KL(f(x) || f(x')) in the eps-ball, in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    delta = project(0.001 * torch.randn_like(x), x, eps)
    for _ in range(steps):
        x_adv = (x + delta).requires_grad_(True)
        (grad,) = torch.autograd.grad(kl_to(model(x_adv), p_clean).sum(), x_adv)
        delta = project(delta + alpha * grad.sign(), x, eps)
    model.train(was_training)
    return x + delta


class TRADES(Method):
    Options = TRADESOptions

    @staticmethod
    def passes(options):
        return options.steps + 1  # k steps on the KL term and the training pass (clean and adversarial rows)

    def step(self, x, y):
        o = self.options
        x_adv = trades_adversary(self.model, x, self.eps, alpha=default_step(self.eps, o.alpha), steps=o.steps)
        logits = self.loss_model(x)
        robust = kl_to(self.loss_model(x_adv), F.softmax(logits, dim=1)).mean()
        loss = F.cross_entropy(logits, y) + o.beta * robust
        self.update(loss)
        return {"loss": loss.detach(), "robust_kl": robust.detach(), "train_acc": accuracy(logits, y)}
