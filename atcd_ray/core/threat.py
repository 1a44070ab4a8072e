"""The L-inf threat model: inputs live in [0, 1], perturbations in an eps-ball around them.

The gradient attacks and the training methods project through ``project``, so the eps-ball and
the image box are enforced in one place. Two exceptions, on purpose: N-FGSM's training inputs
leave the ball unless ``clip`` (its paper's point), and RayS, which searches along a direction's
radius, clips to the image box and the ball itself (``rays.py``).
"""
from __future__ import annotations

import torch


def project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project a perturbation onto {d : |d|_inf <= eps, 0 <= x + d <= 1}.

    The two constraints are boxes, so clamping to their intersection is the exact
    Euclidean projection; the image box is applied last so that x + delta is a valid image.
    """
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0) - x


def uniform_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A random start delta ~ Uniform(-eps, eps), projected so that x + delta lies in [0, 1]."""
    return project(torch.empty_like(x).uniform_(-eps, eps), x, eps)


def default_step(eps: float, step: float | None = None) -> float:
    """An attack's step: ``step`` where given, else eps / 4 (the paper's 2/255 at eps = 8/255,
    PGD-10's usual step), the one default of every attack and method here."""
    return eps / 4 if step is None else step
