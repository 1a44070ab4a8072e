"""The Hamiltonian dynamics shared by ATCD's trajectory and the HMC attack (paper, Eq. 3-11 and A.6).

State per example: position offset ``delta`` (theta = x + delta) and momentum ``v``. A step is a
kick (the momentum, v - alpha * grad U with U = -J) and a drift (the position, theta + eta *
grad K(v) with K(v) = |v|). By default both are FGSM-normalised (sign), as the paper's Eq. 10-11
read the FGSM family as HMC:
    v     <- clip(v + alpha * sign(g), -eps, eps)
    delta <- P(delta + eta * sign(v))
``kick(direction="gradient")`` uses the raw gradient of Algorithm 1 instead, per example divided
by its mean absolute value (MI-FGSM's L1 normalisation, times the dimension), so that ``alpha``
keeps the units of eps: the mean |kick| is alpha whatever the gradient's scale.
"""
from __future__ import annotations

import torch

from .losses import cross_entropy, mh_log_accept
from .threat import default_step, project, uniform_start


def kick(v, grad, *, alpha, eps, momentum=True, direction="sign"):
    """The momentum step: ``v + alpha * d`` clipped to [-eps, eps], d the signed (``sign``) or
    per-example L1-normalised (``gradient``) ``grad``, the gradient of the objective J in theta
    (so -grad U: the kick climbs J); ``momentum=False`` replaces v by the step."""
    if direction == "sign":
        step = alpha * grad.sign()
    else:
        scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
        step = alpha * grad / scale
    return ((v + step) if momentum else step).clamp(-eps, eps)


def drift(x, delta, v, *, eta, eps):
    """The position step: ``delta + eta * sign(v)`` (grad K(v) for K(v) = |v|), projected."""
    return project(delta + eta * v.sign(), x, eps)


def kick_drift(x, delta, v, grad, *, eps, alpha, eta, momentum=True, direction="sign"):
    """One kick, then a drift along the new momentum (symplectic Euler: no half-kicks, so not a
    leapfrog; the HMC attack's proposal, and ATCD's step under ``order = kick_drift``)."""
    v = kick(v, grad, alpha=alpha, eps=eps, momentum=momentum, direction=direction)
    return drift(x, delta, v, eta=eta, eps=eps), v


def kinetic(v, eps, kappa):
    """K(v) = kappa * mean|v| / eps per example: |v| of Algorithm 1, scaled into [0, kappa]."""
    return kappa * v.abs().flatten(1).mean(1) / max(eps, 1e-12)


def mh_accept(h_old, h_new, tau):
    """Per-example Metropolis-Hastings decision with probability min(1, exp((H_old - H_new) / tau))."""
    log_accept = mh_log_accept(h_old, h_new, tau)
    return torch.rand_like(log_accept).log() < log_accept


def select_examples(mask, new, old):
    """Per example (first dimension), ``new`` where ``mask`` holds, else ``old``."""
    return torch.where(mask.view(-1, *[1] * (new.ndim - 1)), new, old)


def hmc_attack(model, x, y, eps, *, proposals, alpha=None, eta=None, tau=1.0, kappa=1.0, return_sequence=False):
    """The HMC attack of the paper's appendix A.6: a chain on U = -CE with M-H correction.

    Each proposal is one ``kick_drift`` step from the current state (one forward and backward
    pass: the pass at the proposal gives both its energy and its gradient). A rejected example stays, and its
    momentum is redrawn uniformly in [-eps, eps], since the deterministic dynamics would otherwise
    propose the same point again. Returns the strongest state visited per example (misclassified
    first, then highest loss), and with ``return_sequence`` also the sequence of chain states.
    """
    alpha, eta = default_step(eps, alpha), default_step(eps, eta)

    def energy_and_grad(delta):
        x_adv = (x + delta).detach().requires_grad_(True)
        logits = model(x_adv)
        ce = cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(ce.sum(), x_adv)
        score = ce.detach() + 1e9 * (logits.argmax(1) != y).float()
        return -ce.detach(), grad, score

    delta = uniform_start(x, eps)
    v = delta.clone()
    u, grad, score = energy_and_grad(delta)
    best, best_score, sequence = x + delta, score, []
    for _ in range(proposals):
        new_delta, new_v = kick_drift(x, delta, v, grad, eps=eps, alpha=alpha, eta=eta)
        new_u, new_grad, new_score = energy_and_grad(new_delta)
        accept = mh_accept(u + kinetic(v, eps, kappa), new_u + kinetic(new_v, eps, kappa), tau)
        delta, u, grad = select_examples(accept, new_delta, delta), torch.where(accept, new_u, u), select_examples(accept, new_grad, grad)
        v = select_examples(accept, new_v, torch.empty_like(v).uniform_(-eps, eps))
        improved = new_score > best_score
        best = select_examples(improved, x + new_delta, best)
        best_score = torch.maximum(best_score, new_score)
        if return_sequence:
            sequence.append((x + delta).detach())
    best = best.detach()
    return (best, sequence) if return_sequence else best
