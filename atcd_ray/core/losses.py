"""Per-example losses shared by the attacks and the methods.

All functions take logits of shape (N, C) and integer labels of shape (N,) and return
one value per example, so that callers choose how to reduce (attacks sum, M-H keeps them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def kl_to(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) per example: TRADES' robust term (its official KLDivLoss, summed)."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="none").sum(dim=1)


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y; positive means misclassified."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true_logit


def cd_objective(
    logits: torch.Tensor, y: torch.Tensor, p_prev: torch.Tensor | None, *, lam: float, rho: float
) -> torch.Tensor:
    """The contrastive-divergence objective J_cd of the paper's Eq. 13-14, per example.

    J_cd = lam * CE(z, y) - rho * <stopgrad(p_prev - y), z>

    Its gradient with respect to the logits z is lam * (p - y) - rho * (p_prev - y); with
    lam = 2, rho = 1 that is p - (y - (p - p_prev)), Eq. 14's amendment of the label by the
    change of the output since the last chain end. p_prev is the softmax of the previous
    weights at the previous chain end; None (the first replay of a minibatch) means p_prev = y,
    so the rho term vanishes. The HMC potential energy is U = -J_cd.
    """
    j = lam * cross_entropy(logits, y)
    if p_prev is not None and rho != 0:
        # <p_prev - onehot(y), z> without a one-hot (F.one_hot checks the labels on the host)
        true_logit = logits.gather(1, y[:, None]).squeeze(1)
        j = j - rho * ((p_prev.detach() * logits).sum(dim=1) - true_logit)
    return j


def mh_log_accept(h_old: torch.Tensor, h_new: torch.Tensor, tau: float) -> torch.Tensor:
    """log of the Metropolis-Hastings acceptance probability min(1, exp((H_old - H_new) / tau)).

    tau = inf accepts everything; tau = 0 accepts exactly the proposals that do not raise H.
    """
    diff = (h_old - h_new).float()
    if tau == float("inf"):
        return torch.zeros_like(diff)
    if tau == 0:
        return torch.where(diff >= 0, 0.0, float("-inf"))
    return (diff / tau).clamp(max=0.0)
