"""RayS (Chen & Gu 2020, "RayS: A Ray Searching Method for Hard-label Adversarial Attack"),
written from the paper for L-inf, batched over examples.

Hard-label: it sees only the predicted class. Each example keeps a sign direction d in {-1, 1}^D
and the smallest radius r at which clip(x + r d) is misclassified. Directions are refined by
flipping the sign of ever smaller blocks of coordinates (1, 2, 4, ... blocks); a flip is kept if
it is already adversarial at the current radius, and its radius is then found by bisection. An
example is broken once r <= eps. Used to check that robustness is not gradient masking.
"""
from __future__ import annotations

import torch


def _misclassified(model, x, direction, radius, *, y, mask=None):
    """One query for each example in ``mask`` (all by default); False elsewhere."""
    mask = torch.ones_like(y, dtype=torch.bool) if mask is None else mask
    out = torch.zeros_like(mask)
    if mask.any():
        with torch.no_grad():
            x_adv = (x[mask] + radius[mask].view(-1, *[1] * (x.ndim - 1)) * direction[mask]).clamp(0, 1)
            out[mask] = model(x_adv).argmax(1) != y[mask]
    return out


def rays(model, x: torch.Tensor, y: torch.Tensor, eps: float, *, queries: int = 10000,
         bisection_steps: int = 10) -> torch.Tensor:
    n, dim = x.shape[0], x[0].numel()
    direction = torch.ones_like(x)
    radius = torch.full((n,), float("inf"), device=x.device)
    used = torch.zeros(n, dtype=torch.long, device=x.device)
    one = torch.ones(n, device=x.device)
    # Initial radius along d = 1: the whole box if that is adversarial at all, then bisection.
    found = _misclassified(model, x, direction, one, y=y)
    used += 1
    radius = _bisect(model, x, y, direction, low=torch.zeros(n, device=x.device), high=one, mask=found, radius=radius,
                     used=used, steps=bisection_steps)
    level, block = 0, 0
    while True:
        active = (radius > eps) & (used < queries)
        if not active.any():
            break
        size = -(-dim // 2 ** level)
        start, end = block * size, min(dim, (block + 1) * size)
        candidate = direction.view(n, dim).clone()
        candidate[:, start:end] *= -1
        candidate = candidate.view_as(x)
        finite = torch.where(torch.isfinite(radius), radius, one)
        better = _misclassified(model, x, candidate, finite, y=y, mask=active)
        used += active.long()
        if better.any():
            direction[better] = candidate[better]
            radius = _bisect(model, x, y, direction, low=torch.zeros_like(radius), high=finite, mask=better,
                             radius=radius, used=used,
                             steps=bisection_steps)
        block += 1
        if block == 2 ** level or end == dim:
            level, block = level + 1, 0
            if size == 1:
                level = 0  # every coordinate has been tried alone: start over with coarse blocks
    x_adv = (x + torch.where(radius <= eps, radius, torch.full_like(radius, eps)).view(-1, *[1] * (x.ndim - 1))
             * direction).clamp(0, 1)
    return x + (x_adv - x).clamp(-eps, eps)


def _bisect(model, x, y, direction, *, low, high, mask, radius, used, steps):
    """For examples in ``mask`` (adversarial at ``high``), shrink [low, high] around the boundary."""
    if not mask.any():
        return radius
    low, high = low.clone(), high.clone()
    for _ in range(steps):
        mid = (low + high) / 2
        adv = _misclassified(model, x, direction, mid, y=y, mask=mask)
        used += mask.long()
        high = torch.where(mask & adv, mid, high)
        low = torch.where(mask & ~adv, mid, low)
    return torch.where(mask, torch.minimum(radius, high), radius)
