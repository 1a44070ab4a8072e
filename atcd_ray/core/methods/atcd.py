"""ATCD: Adversarial Training using Contrastive Divergence (the paper's Algorithm 1).

Read as ``../shared/ALGORITHM.md`` fixes it (docs/ALGORITHM_NOTES.md lists where this file
departs and why). Per minibatch, T replays; each replay runs K leapfrog-like steps of an HMC
chain on the potential U = -J_cd (Eq. 13-14), corrects the proposal per example with a
Metropolis-Hastings test, and takes one optimiser step on the corrected adversarial batch.

Chain state per example: position offset ``delta`` (theta = x + delta) and momentum ``v``.
    v     <- clip(v + alpha * sign(grad_theta J_cd), -eps, eps)   # v - alpha * grad U, FGSM-normalised
    delta <- P(delta + eta * sign(v))                              # theta + eta * grad K(v), K(v) = |v|
M-H: H = U(x + delta) + kappa * mean|v| / eps; accept with probability min(1, exp((H_old - H_new) / tau)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..hmc import kinetic, leapfrog, mh_accept, select_examples
from ..losses import cd_potential
from ..threat import project, uniform_start
from .base import Method, accuracy


@dataclass
class ATCDOptions:
    T: int = 4  # replays (weight updates) per minibatch
    K: int = 2  # trajectory steps per replay
    lam: float = 2.0  # lambda of Eq. 13
    rho: float = 1.0  # rho of Eq. 13
    alpha: float | None = None  # momentum step; None means eps
    eta: float | None = None  # position step (Algorithm 1's eps); None means eps
    momentum: bool = True  # False: v is the current signed gradient (the I-FGSM / Free update)
    mh: bool = True  # Metropolis-Hastings correction
    tau: float = 1.0  # M-H temperature
    kappa: float = 1.0  # weight of the kinetic energy, scaled into [0, kappa]
    reuse_grad: bool = False  # the update's backward also yields the next replay's first step
    init: str = "carry"  # "carry": the chain persists across minibatches; "uniform": fresh each minibatch
    cd_target: str = "cached"  # "cached": p_prev from the last update's forward; "exact": old weights at theta

    def validate(self):
        for name in ("T", "K"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("alpha", "eta"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (or null for eps)")
        if self.tau < 0 or self.kappa < 0:
            raise ValueError("tau and kappa must be >= 0")
        if self.init not in ("carry", "uniform"):
            raise ValueError("init must be one of: carry, uniform")
        if self.cd_target not in ("cached", "exact"):
            raise ValueError("cd_target must be one of: cached, exact")


class ATCD(Method):
    Options = ATCDOptions

    def __init__(self, *args):
        super().__init__(*args)
        self.delta = self.v = self.pending_grad = None  # the chain carried across minibatches
        self.previous_weights = None  # w~, for cd_target = exact

    def step(self, x, y):
        o = self.options
        alpha, eta = o.alpha or self.eps, o.eta or self.eps
        delta, v = self._start(x)
        p_prev = None  # the first replay of a minibatch uses p_prev = y
        accepted, decided, logs = 0, 0, []
        for _ in range(o.T):
            delta0, v0, u0 = delta, v, None
            for k in range(o.K):  # Stage 1: K trajectory steps
                if k == 0 and o.reuse_grad:
                    g = self.pending_grad
                    u0 = self.pending_potential  # U at delta0, from the last update's forward
                    if g is None:  # a fresh chain has no gradient yet: train on its start
                        continue
                else:
                    g, u = self._potential_grad(x, delta, y, p_prev)
                    u0 = u if k == 0 else u0
                delta, v = leapfrog(x, delta, v, g, self.eps, alpha, eta, o.momentum)

            # Stage 2: the update's forward at the proposal also gives H_new for the M-H test.
            x_adv = (x + delta).requires_grad_(o.reuse_grad)
            logits = self.loss_model(x_adv)
            leaves = [x_adv]  # the inputs the update's backward differentiates (see _reforward)
            if o.mh and u0 is not None:
                u1 = -cd_potential(logits.detach(), y, self._p_prev(x + delta, p_prev), o.lam, o.rho)
                accept = mh_accept(u0 + kinetic(v0, self.eps, o.kappa), u1 + kinetic(v, self.eps, o.kappa), o.tau)
                accepted, decided = accepted + accept.sum().item(), decided + accept.numel()
                if not accept.all():  # rejected examples revert to the chain state before this replay
                    delta, v = select_examples(accept, delta, delta0), select_examples(accept, v, v0)
                    x_adv, logits = self._reforward(x + delta, accept, logits)
                    leaves.append(x_adv)
            loss = F.cross_entropy(logits, y)
            if o.cd_target == "exact":
                self.previous_weights = {name: w.detach().clone() for name, w in self.model.state_dict().items()}
            self.update(loss)
            p_prev = F.softmax(logits.detach().float(), dim=1)  # w~ <- w
            logs.append((loss.item(), accuracy(logits, y)))
            if o.reuse_grad:
                # At the old weights and this theta, p = p_prev, so grad J_cd = (lam - rho) * grad CE.
                # Rows re-run apart get their gradient on the second leaf and zero on the first.
                self.pending_grad = (o.lam - o.rho) * sum(t.grad for t in leaves if t.grad is not None)
                self.pending_potential = -cd_potential(logits.detach(), y, p_prev, o.lam, o.rho)
        self._keep(delta, v)
        stats = {"loss": sum(l for l, _ in logs) / len(logs), "train_acc": logs[-1][1]}
        if decided:
            stats["mh_accept_rate"] = accepted / decided
        return stats

    def _reforward(self, theta, accept, logits):
        """A new input leaf at the positions after the M-H test, and the logits there. Without
        BatchNorm the rows of a forward are independent, so only the rejected rows are run again
        and spliced in (re-running the whole minibatch cost ATCD a sixth of its step,
        docs/PERFORMANCE.md); BatchNorm couples the rows, so then the whole minibatch is re-run."""
        x_adv = theta.detach().requires_grad_(self.options.reuse_grad)
        if self._has_batchnorm():
            return x_adv, self.loss_model(x_adv)
        rejected = ~accept
        logits = logits.clone()
        logits[rejected] = self.loss_model(x_adv[rejected])
        return x_adv, logits

    def _has_batchnorm(self) -> bool:
        if not hasattr(self, "_batchnorm"):
            self._batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        return self._batchnorm

    def _start(self, x):
        """The chain state for this minibatch: carried over (projected onto x's ball), or fresh."""
        self.pending_potential = None  # an energy at another x means nothing here
        if self.options.init == "carry" and self.delta is not None and self.delta.shape == x.shape:
            return project(self.delta, x, self.eps), self.v
        self.pending_grad = None
        delta = uniform_start(x, self.eps)
        return delta, delta.clone()  # theta^0 = x + v0

    def _keep(self, delta, v):
        self.delta, self.v = delta.detach(), v.detach()

    def _p_prev(self, x_adv, p_prev):
        if p_prev is None or self.options.cd_target == "cached":
            return p_prev
        with torch.no_grad():  # exact: the previous weights evaluated at this theta
            return F.softmax(functional_call(self.model, self.previous_weights, (x_adv,)).float(), dim=1)

    def _potential_grad(self, x, delta, y, p_prev):
        """One pass: grad_theta J_cd at theta = x + delta, and U = -J_cd there, per example."""
        x_adv = (x + delta).detach().requires_grad_(True)
        logits = self.model(x_adv)
        j = cd_potential(logits, y, self._p_prev(x_adv.detach(), p_prev), self.options.lam, self.options.rho)
        (grad,) = torch.autograd.grad(j.sum(), x_adv)
        return grad, -j.detach()

    def state_dict(self):
        state = {"delta": self.delta, "v": self.v, "pending_grad": self.pending_grad}
        return {k: t for k, t in state.items() if t is not None}

    def load_state_dict(self, state):
        self.delta, self.v, self.pending_grad = state.get("delta"), state.get("v"), state.get("pending_grad")
