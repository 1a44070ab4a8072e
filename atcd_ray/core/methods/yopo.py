"""YOPO-m-n (Zhang et al. 2019, "You Only Propagate Once") and TRADES+YOPO, as the official code.

Per minibatch, m full forward/backward passes; after each, the co-state p = -dL/dz1 at the first
layer's output z1 (Pontryagin's maximum principle) drives n cheap adversary updates through the
first layer alone: delta <- P(delta + sigma * sign(grad_delta <z1(x + delta), -p>)). The weight
gradient is accumulated over the m full backwards, plus, for the first layer, the gradient of
<z1(x + delta), -p> at each updated delta; one optimiser step per minibatch (the official
recipe divides the learning rate by m accordingly).

TRADES+YOPO runs the same adversary on TRADES' KL objective (model in eval mode), discards the
layer-one gradients as the official code does (it zeroes them before the update), then takes the
TRADES step with beta (1 in the official TRADES+YOPO code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import kl_to
from ..models import first_layer, first_layer_output
from ..threat import default_step, project, uniform_start
from .base import Method, accuracy


@dataclass
class YOPOOptions:
    m: int = 5  # full propagations per minibatch
    n: int = 3  # first-layer-only adversary updates per full propagation
    sigma: float | None = None  # adversary step; None means eps/4 (2/255 at 8/255)
    beta: float = 1.0  # TRADES+YOPO only

    def validate(self):
        if self.m < 1 or self.n < 1 or self.beta < 0:
            raise ValueError("need m >= 1, n >= 1, beta >= 0")


def forward_keeping_z1(model, x_adv, loss_fn):
    """(loss, logits, z1): z1, the first layer's output, kept with ``retain_grad``, so that the
    caller's backward of ``loss`` fills ``z1.grad`` = -p, YOPO's co-state."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["z1"] = output

    handle = first_layer(model).register_forward_hook(keep)
    try:
        logits = model(x_adv)
    finally:
        handle.remove()
    loss = loss_fn(logits)
    return loss, logits, captured["z1"]


def layer_one_ascent(model, x, delta, p, *, eps, sigma, steps):
    """n updates of delta through the first layer only: ascent on <z1(x + delta), -p>."""
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        hamiltonian = (first_layer_output(model, x + delta) * p).sum()
        (grad,) = torch.autograd.grad(hamiltonian, delta)
        delta = project(delta - sigma * grad.sign(), x, eps)
    return delta.detach()


class YOPO(Method):
    Options = YOPOOptions

    @staticmethod
    def passes(options):
        return options.m  # the n first-layer updates per pass are not counted: wall seconds show them

    def step(self, x, y):
        o, sigma = self.options, default_step(self.eps, self.options.sigma)
        delta = uniform_start(x, self.eps)
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(o.m):
            loss, logits, z1 = forward_keeping_z1(self.model, x + delta, lambda out: F.cross_entropy(out, y))
            loss.backward()  # weight gradients of every layer accumulate over the m passes
            p = -z1.grad.detach()
            delta = layer_one_ascent(self.model, x, delta, p, eps=self.eps, sigma=sigma, steps=o.n)
            # The first layer's weight gradient at the new delta, through the co-state.
            (-(first_layer_output(self.model, x + delta) * p).sum()).backward()
        self.average_gradients()  # the m + m backwards above ran on the bare module: rank-local
        self.optimizer.step()
        return {"loss": loss.detach(), "train_acc": accuracy(logits, y)}


class TRADESYOPO(Method):
    Options = YOPOOptions

    @staticmethod
    def passes(options):
        return options.m + 1  # m propagations on the KL term, then the TRADES training pass

    def step(self, x, y):
        o, sigma = self.options, default_step(self.eps, self.options.sigma)
        self.model.eval()  # the adversary, as TRADES, in eval mode
        with torch.no_grad():
            p_clean = F.softmax(self.model(x), dim=1)
        delta = project(0.001 * torch.randn_like(x), x, self.eps)
        for _ in range(o.m):
            kl, _, z1 = forward_keeping_z1(self.model, x + delta, lambda out: kl_to(out, p_clean).sum())
            (grad_z1,) = torch.autograd.grad(kl, z1)  # only the co-state: no weight gradients
            delta = layer_one_ascent(self.model, x, delta, -grad_z1, eps=self.eps, sigma=sigma, steps=o.n)
        self.model.train()
        logits = self.loss_model(x)
        robust = kl_to(self.loss_model(x + delta), F.softmax(logits, dim=1)).mean()
        loss = F.cross_entropy(logits, y) + o.beta * robust
        self.update(loss)
        return {"loss": loss.detach(), "robust_kl": robust.detach(), "train_acc": accuracy(logits, y)}
