"""White-box L-inf attacks as functions ``(model, x, y, eps, ...) -> x_adv``.

Conventions (those of torchattacks): inputs and outputs in [0, 1]; gradients are taken with
``torch.autograd.grad`` with respect to the input only, so parameters' ``.grad`` is never
touched; the model's train/eval mode is left as the caller set it (evaluation calls ``eval()``,
adversarial training attacks in whatever mode it trains in). Every output lies in the
eps-ball around ``x`` and in [0, 1] (``threat.project``).
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterator

import torch
from torch import nn

from .hmc import hmc_attack, select_examples
from .losses import cross_entropy, cw_margin
from .rays import rays
from .threat import default_step, project, uniform_start

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def input_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-example loss with respect to the input, and the logits."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    (grad,) = torch.autograd.grad(LOSSES[loss](logits, y).sum(), x_adv)
    return grad, logits.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps from x."""
    grad, _ = input_grad(model, x, y)
    return x + project(eps * grad.sign(), x, eps)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *, alpha: float,
    steps: int,
    restarts: int = 1,
    random_start: bool = True,
    loss: str = "ce",
) -> torch.Tensor:
    """PGD-k (Madry et al. 2018): ``steps`` signed-gradient ascent steps of size ``alpha`` on
    ``loss`` ("ce", or "cw" for the CW-inf margin attack), each followed by projection.

    With several restarts each example keeps the result of the first restart that
    misclassifies it, else the one with the highest loss.
    """
    best = x.clone()
    best_score = torch.full((x.shape[0],), float("-inf"), device=x.device)
    for _ in range(restarts):
        delta = uniform_start(x, eps) if random_start else torch.zeros_like(x)
        for _ in range(steps):
            grad, _ = input_grad(model, x + delta, y, loss)
            delta = project(delta + alpha * grad.sign(), x, eps)
        x_adv = x + delta
        with torch.no_grad():
            logits = model(x_adv)
            # Misclassified examples outrank every correctly classified one.
            score = LOSSES[loss](logits, y).float() + 1e9 * (logits.argmax(1) != y).float()
        best = select_examples(score > best_score, x_adv, best)  # no boolean indexing: no host sync
        best_score = torch.maximum(best_score, score)
    return best


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float, steps: int) -> torch.Tensor:
    """CW-inf: PGD on the Carlini-Wagner margin loss (the "CW" column of the paper's tables)."""
    return pgd(model, x, y, eps, alpha=alpha, steps=steps, loss="cw")


def mifgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float, steps: int, decay: float = 1.0
) -> torch.Tensor:
    """MI-FGSM (Dong et al. 2018): the signed step follows g <- decay * g + grad / |grad|_1."""
    delta = torch.zeros_like(x)
    momentum = torch.zeros_like(x)
    dims = tuple(range(1, x.ndim))
    for _ in range(steps):
        grad, _ = input_grad(model, x + delta, y)
        momentum = decay * momentum + grad / grad.abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)
        delta = project(delta + alpha * momentum.sign(), x, eps)
    return x + delta


class _LeaveAsFound:
    """Library attacks may switch the model to eval or leave parameter gradients behind:
    restore both, so every attack here has the same contract."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.model.parameters()]

    def __exit__(self, *exc):
        self.model.train(self.training)
        for p, g in zip(self.model.parameters(), self.grads):
            p.grad = g


def torchattacks_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, alpha: float,
                     steps: int) -> torch.Tensor:
    """torchattacks' PGD: an implementation independent of this project, to cross-check ours."""
    import torchattacks  # installed with --no-deps (see scripts/setup.sh)

    with _LeaveAsFound(model):
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, queries: int = 5000) -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020), score-based and gradient-free, from torchattacks."""
    import torchattacks

    with _LeaveAsFound(model):
        return torchattacks.Square(model, eps=eps, n_queries=queries, seed=0)(x, y)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) from pyautoattack, the authors' code."""
    from pyautoattack import AutoAttack

    with _LeaveAsFound(model):
        model.eval()
        x_adv, _ = AutoAttack(model, eps=eps, version="standard", device=x.device, seed=0).run_standard_evaluation(
            x, y, batch_size=len(x))
    return x_adv


@contextlib.contextmanager
def autoattack_flags() -> Iterator[list[str]]:
    """The warnings of AutoAttack's own checks while the block runs, in order without repeats:
    pyautoattack logs them on its ``auto-attack`` logger (points with zero gradient; Square, run
    last, breaking examples the gradient attacks left), so an evaluation can keep them with its
    figures rather than in a log that other runs share."""
    flags: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() not in flags:
                flags.append(record.getMessage())

    logger, handler = logging.getLogger("auto-attack"), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield flags
    finally:
        logger.removeHandler(handler)


_ITERATIVE = {"pgd": pgd, "mifgsm": mifgsm, "cw": cw_inf, "tapgd": torchattacks_pgd,
              "hmc": lambda model, x, y, eps, *, alpha, steps: hmc_attack(model, x, y, eps, proposals=steps,
                                                                          alpha=alpha, eta=alpha)}
_NAME = re.compile(r"^(pgd|mifgsm|cw|tapgd|hmc)(\d+)(?:x(\d+))?$")
_QUERY_NAME = re.compile(r"^(square|rays)(\d*)$")
HMC_PROPOSALS = 20  # "hmc" alone: as many passes as pgd20
ATTACK_NAMES = ("fgsm, pgdN, pgdNxR (R restarts), mifgsmN, cwN, tapgdN (torchattacks' PGD), "
                f"hmc[N] (N proposals; default {HMC_PROPOSALS}), autoattack, square[Q], rays[Q] "
                "(Q queries; default 5000 and 10000)")


def build_attack(name: str, eps: float, alpha: float | None = None) -> Attack:
    """Attack from its table name: ``pgd20`` is PGD with 20 steps, ``pgd50x5`` with 5 restarts.

    The default step is eps/4 (the paper's 2/255 at eps = 8/255).
    """
    if name == "fgsm":
        return lambda model, x, y: fgsm(model, x, y, eps)
    if name == "autoattack":
        return lambda model, x, y: autoattack(model, x, y, eps)
    query_match = _QUERY_NAME.match(name)
    if query_match:
        kind, queries = query_match[1], int(query_match[2] or (5000 if query_match[1] == "square" else 10000))
        if queries < 1:
            raise ValueError(f"attack {name!r}: the query budget must be >= 1")
        if kind == "square":
            return lambda model, x, y: square(model, x, y, eps, queries=queries)
        return lambda model, x, y: rays(model, x, y, eps, queries=queries)
    match = _NAME.match(f"hmc{HMC_PROPOSALS}" if name == "hmc" else name)
    if not match or int(match[2]) < 1:
        raise ValueError(f"unknown attack {name!r}; allowed: {ATTACK_NAMES}")
    kind, steps, restarts = match[1], int(match[2]), int(match[3] or 1)
    step = default_step(eps, alpha)
    if restarts > 1 and kind != "pgd":
        raise ValueError(f"attack {name!r}: restarts are supported for pgd only")
    if kind == "pgd":
        return lambda model, x, y: pgd(model, x, y, eps, alpha=step, steps=steps, restarts=restarts)
    return lambda model, x, y: _ITERATIVE[kind](model, x, y, eps, alpha=step, steps=steps)
