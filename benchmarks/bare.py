"""A method's forward and backward passes with none of its logic: the yardstick for its overhead.

``BareLoop(model, optimizer, eps, updates, attack_passes)`` trains each minibatch with
``updates`` optimiser steps, each after ``attack_passes`` input-gradient passes and followed by one
training pass whose backward also yields the input gradient; a signed step between passes keeps
the inputs moving as an attack's do. Natural training is (1, 0), Fast-FGSM (1, 1), Free-m (m, 0),
PGD-k (1, k), ATCD-T-K (T, K), or (T, K - 1) with ``reuse_grad``.
"""
import torch
import torch.nn.functional as F


class BareLoop:
    def __init__(self, model, optimizer, eps: float, updates: int, attack_passes: int):
        self.model, self.optimizer, self.eps = model, optimizer, eps
        self.updates, self.attack_passes = updates, attack_passes

    @property
    def passes(self) -> int:
        """Forward and backward passes per minibatch."""
        return self.updates * (self.attack_passes + 1)

    def step(self, x, y):
        eps = self.eps
        delta = torch.empty_like(x).uniform_(-eps, eps)
        for _ in range(self.updates):
            for _ in range(self.attack_passes):
                x_adv = (x + delta).requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x_adv), y), x_adv)
                delta = (delta + eps * grad.sign()).clamp(-eps, eps)
            x_adv = (x + delta).requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            delta = (delta + eps * x_adv.grad.sign()).clamp(-eps, eps)
        return {}
