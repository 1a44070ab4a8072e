"""ATCD: Adversarial Training using Contrastive Divergence (the paper's Algorithm 1).

Read as ALGORITHM.md fixes it; docs/ALGORITHM_NOTES.md lists where this file departs and why.
Algorithm 1, numbered as the comments below cite it (w the weights, w~ the previous weights):

     1  U(theta) = -J_cd(f_w(theta^(k-1)), f_w~(theta^K), y),  K(v) = |v|      Stage 0 (Eq. 13-14)
     2  w~ = w = w_0,  theta^K = theta^0
     3  for epoch = 1 .. N / (T K), for each minibatch (x, y):
     4      theta^0 <- x + v_0,  v_0 ~ Uniform(-eps, eps)
     5      for t = 1 .. T:
     6          for k = 1 .. K:                                                 Stage 1
     7              theta^k <- theta^(k-1) + eta * grad K(v)
     8              v <- v - alpha * grad U(theta)
     9              v <- clip(v, -eps, eps)
    10          (theta^K, v) = (theta^k, v), accepted or rejected by an M-H step
    11          g_w <- E[grad_w J_ce(f_w(theta^K), y)]                            Stage 2
    12          w~ <- w
    13          w <- w - lr * g_w

Per example the chain holds a position offset ``delta`` (theta = x + delta) and a momentum ``v``;
lines 7-9 are ``core/hmc.py: drift`` and ``kick``. Where Algorithm 1 is open to more than one
reading, an option names each (``init``, ``kick``, ``order``, ``mh_start``); docs/ALGORITHM_NOTES.md
gives the paper's words, ours, and the ablation that chose the recipes' values.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..batchnorm import BatchStatistics
from ..hmc import drift, kick, kick_drift, kinetic, mh_accept, select_examples
from ..losses import cd_objective
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
    # Line 4, the chain's start on a new minibatch: "carry": delta and v persist from the last
    # minibatch (Section 5's persistent chain); "carry_delta": delta persists, v restarts at the
    # start's offset (as theta^0 = x + v_0 does); "uniform": fresh each minibatch, as line 4 reads.
    init: str = "carry"
    kick: str = "sign"  # line 8's step: "sign" (FGSM-normalised) or "gradient" (per-example L1-normalised)
    # Lines 7-8, both from the gradient at the step's start: "kick_drift" kicks, then drifts
    # along the new momentum (ALGORITHM_NOTES.md, decision 1); "drift_kick" drifts along the old
    # momentum v_(t-1), then kicks, as Algorithm 1 writes them.
    order: str = "kick_drift"
    # H_old of line 10 under reuse_grad, whose first step makes no pass at the replay's start:
    # "evaluate" runs the current weights there (a forward, no backward), so that H_old and H_new
    # are one energy function; "reuse" takes the last update's forward (the previous weights), and
    # a replay with no such forward (a minibatch's first) is not tested.
    mh_start: str = "evaluate"
    cd_target: str = "cached"  # "cached": p_prev from the last update's forward; "exact": old weights at theta
    # After an M-H rejection the update needs the logits at the reverted rows. "rows": run only
    # those rows again (BatchNorm layers normalise them with the proposal forward's statistics);
    # "batch": run the whole corrected minibatch again (exact with BatchNorm, one more forward).
    # None: "batch" on CUDA, where the row re-run's bookkeeping costs more than the forward it
    # saves (1.4-1.9x the bare loop in bf16 on an H100 against 1.1-1.2x), "rows" on the CPU, where
    # it costs nothing measurable (docs/PERFORMANCE.md).
    mh_rerun: str | None = None
    # Rows re-run per replay, as a fraction of the minibatch. None: exactly the rejected rows on
    # the CPU, 1/4 of the minibatch on CUDA, where reading how many were rejected would make the
    # step wait for the GPU; rejected rows beyond it train at their proposal (mh_rerun_overflow).
    rerun_capacity: float | None = None

    def validate(self):
        for name in ("T", "K"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("alpha", "eta"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (or null for eps)")
        if self.tau < 0 or self.kappa < 0:
            raise ValueError("tau and kappa must be >= 0")
        for name, allowed in (("init", ("carry", "carry_delta", "uniform")), ("kick", ("sign", "gradient")),
                              ("order", ("kick_drift", "drift_kick")), ("mh_start", ("evaluate", "reuse"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of: {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.cd_target not in ("cached", "exact"):
            raise ValueError("cd_target must be one of: cached, exact")
        if self.mh_rerun not in (None, "rows", "batch"):
            raise ValueError("mh_rerun must be one of: rows, batch (or null: batch on CUDA, rows on the CPU)")
        if self.rerun_capacity is not None and not 0 < self.rerun_capacity <= 1:
            raise ValueError("rerun_capacity must be in (0, 1] (or null)")


DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _draw_seed() -> int:
    """A seed from the default generator's stream, read without a tensor-to-host copy (which the
    host-sync check flags): a hash of the generator's state, which one draw then advances, so
    every replay gets its own seed and a resume (the state is checkpointed) the same ones."""
    state = torch.get_rng_state().numpy().tobytes()
    torch.empty(()).random_()
    return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1


class Chain(NamedTuple):
    """Per-example chain state; ``potential`` is U = -J_cd at ``delta``, where it is known."""

    delta: torch.Tensor
    v: torch.Tensor
    potential: torch.Tensor | None = None


class ATCD(Method):
    Options = ATCDOptions
    per_example_state = ("delta", "v", "pending_grad")

    def __init__(self, model, optimizer, eps, options):
        super().__init__(model, optimizer, eps, options)
        self.alpha, self.eta = options.alpha or eps, options.eta or eps
        # The chain carried from one minibatch to the next (init = carry; the paper's Section 5).
        self.delta: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        # reuse_grad: grad_theta J_cd, and U, at the chain's position, left by the last update.
        self.pending_grad: torch.Tensor | None = None
        self.pending_potential: torch.Tensor | None = None
        self.previous_weights: dict | None = None  # w~, kept only for cd_target = exact
        self.batch_stats = BatchStatistics(self.model)  # re-running rejected rows under BatchNorm
        # Under the M-H test a network with dropout draws one mask per replay, shared by every
        # forward of the replay (trajectory, H_old, the update), so that the test compares
        # energies, not masks (the mask noise in U exceeded a step's change on SmallCNN).
        self.shared_masks = options.mh and any(isinstance(m, DROPOUT) for m in self.model.modules())
        self.replay_seed: int | None = None

    @staticmethod
    def passes(options):
        """T replays of K trajectory passes and one training pass; reuse_grad saves one per replay.
        Not counted, as they are no forward-and-backward pass: the M-H re-run of rejected rows and
        the forward for H_old under reuse_grad with mh_start = evaluate; wall seconds show them."""
        return options.T * (options.K if options.reuse_grad else options.K + 1)

    def step(self, x, y):
        """One minibatch: lines 4-13 of Algorithm 1. Returns device tensors (no host sync)."""
        chain = self._start(x)  # line 4, or the chain carried from the last minibatch
        # f_w~(theta^K) of line 1. None stands for p_prev = y (before the minibatch's first update),
        # where J_cd's rho term vanishes.
        p_prev = None
        losses, decisions = [], []
        for _ in range(self.options.T):  # line 5
            if self.shared_masks and self.model.training:
                self.replay_seed = _draw_seed()  # this replay's dropout masks
            start, proposal = self._trajectory(x, y, chain, p_prev)  # lines 6-9
            x_adv, logits = self._forward(x, proposal)  # Stage 2's forward, also H_new for line 10
            chain, logits, decision = self._metropolis_hastings(x, y, start=start, proposal=proposal, x_adv=x_adv,
                                                                logits=logits, p_prev=p_prev)
            loss, p_prev = self._update(x_adv, logits, y)  # lines 11-13
            losses.append(loss)
            decisions += [decision] if decision else []
        self.delta, self.v, self.replay_seed = chain.delta.detach(), chain.v.detach(), None
        stats = {"loss": torch.stack(losses).mean(), "train_acc": accuracy(logits, y)}
        for key in decisions[0] if decisions else ():
            stats[key] = torch.cat([d[key] for d in decisions]).float().mean()
        return stats

    def _start(self, x):
        """Line 4: the chain for this minibatch, carried over (projected onto x's ball) or fresh."""
        self.pending_potential = None  # an energy at another x means nothing here
        init = self.options.init
        if init != "uniform" and self.delta is not None and self.delta.shape == x.shape:
            delta = project(self.delta, x, self.eps)
            return Chain(delta, self.v if init == "carry" else delta.clone())
        self.pending_grad = None
        delta = uniform_start(x, self.eps)
        return Chain(delta, delta.clone())  # theta^0 = x + v_0

    def _trajectory(self, x, y, chain, p_prev):
        """Stage 1, lines 6-9: K steps on U = -J_cd, each a drift (line 7) and a kick (line 8)
        from the gradient at the step's start (Stage 0 evaluates U at theta^(k-1)). Returns the
        start, with U there where the first pass saw it (for the M-H test), and the proposal. With
        reuse_grad the first gradient is the one the last update's backward left (ALGORITHM_NOTES.md,
        decisions 2-3), so it costs no pass."""
        o, start = self.options, chain
        for k in range(o.K):
            if k == 0 and o.reuse_grad:
                grad = self.pending_grad
                if o.mh_start == "reuse":
                    start = start._replace(potential=self.pending_potential)
                if grad is None:  # a fresh chain has no gradient yet: the replay trains on its start
                    continue
            else:
                grad, potential = self._cd_grad_and_potential(x, chain.delta, y, p_prev)
                start = start._replace(potential=potential) if k == 0 else start
            if o.order == "drift_kick":  # as Algorithm 1 writes them: the drift moves along v_(t-1)
                delta = drift(x, chain.delta, chain.v, eta=self.eta, eps=self.eps)
                v = kick(chain.v, grad, alpha=self.alpha, eps=self.eps, momentum=o.momentum, direction=o.kick)
            else:  # the drift moves along the momentum this step's kick made
                delta, v = kick_drift(x, chain.delta, chain.v, grad, eps=self.eps, alpha=self.alpha, eta=self.eta,
                                      momentum=o.momentum, direction=o.kick)
            chain = Chain(delta, v)
        return start, chain

    def _forward(self, x, proposal):
        """The update's forward at the proposal (through DDP). Its logits give H_new; with
        mh_rerun = rows it also records each BatchNorm layer's batch statistics, which ``_rerun``
        uses to normalise the rejected rows it runs again."""
        x_adv = (x + proposal.delta).detach().requires_grad_(self.options.reuse_grad)
        recording = self.options.mh and self._rerun_mode(x) == "rows"
        with self.batch_stats.record() if recording else contextlib.nullcontext():
            return x_adv, self._net(self.loss_model, x_adv)

    def _metropolis_hastings(self, x, y, *, start, proposal, x_adv, logits, p_prev):
        """Line 10: per example, keep the proposal with probability min(1, exp((H_old - H_new) /
        tau)), H = U + kappa mean|v| / eps, else revert to the replay's start; then the update's
        logits at the corrected chain. Returns (chain, logits, decision or None)."""
        o = self.options
        if not o.mh or proposal.delta is start.delta:  # no step was made (reuse_grad, fresh chain)
            return proposal, logits, None
        if start.potential is None:
            if o.mh_start == "reuse":  # the minibatch's first replay: its start was never evaluated
                return proposal, logits, None
            start = start._replace(potential=self._potential(x, start.delta, y, p_prev))
        potential = -cd_objective(logits.detach(), y, self._p_prev(x_adv.detach(), p_prev), lam=o.lam, rho=o.rho)
        accept = mh_accept(start.potential + kinetic(start.v, self.eps, o.kappa),
                           potential + kinetic(proposal.v, self.eps, o.kappa), o.tau)
        chain = Chain(select_examples(accept, proposal.delta, start.delta), select_examples(accept, proposal.v, start.v))
        logits, overflow = self._rerun(x_adv, chain.delta - proposal.delta, ~accept, logits)
        return chain, logits, {"mh_accept_rate": accept, **({"mh_rerun_overflow": overflow} if overflow is not None else {})}

    def _rerun(self, x_adv, shift, rejected, logits):
        """The logits at the corrected chain, x_adv + shift (shift is zero on accepted rows), as a
        function of x_adv, so the input gradient reaches it (reuse_grad). mh_rerun = batch: the
        whole minibatch again, exact. rows: only rejected rows, spliced in; with BatchNorm they are
        normalised by the proposal forward's batch statistics (core/batchnorm.py; the deviation
        from the exact re-run is bounded in tests/test_atcd_batchnorm.py). Returns (logits, overflow):
        rejected rows left at their proposal for want of capacity, or None when there is none."""
        if self._rerun_mode(x_adv) == "batch":
            return self._net(self.loss_model, x_adv + shift), None
        capacity = self.options.rerun_capacity or (0.25 if rejected.is_cuda else None)
        rejected_first = torch.argsort(rejected.to(torch.uint8), descending=True, stable=True)
        rows = rejected_first[:math.ceil(capacity * len(rejected)) if capacity else int(rejected.sum())]
        overflow = rejected.index_fill(0, rows, False) if capacity else None
        if not len(rows):
            self.batch_stats.moments.clear()
            return logits, overflow
        with self.batch_stats.frozen():
            rerun = self.loss_model(x_adv[rows] + shift[rows])
        # Rows re-run only to fill the capacity were accepted: they keep the proposal's logits.
        return logits.index_put((rows,), torch.where(rejected[rows, None], rerun, logits[rows])), overflow

    def _rerun_mode(self, x):
        return self.options.mh_rerun or ("batch" if x.is_cuda else "rows")

    def _update(self, x_adv, logits, y):
        """Stage 2, lines 11-13: one optimiser step on CE at the corrected chain; w~ <- w.
        Returns the loss and p_prev = f_w~(theta^K) for the next replay's J_cd."""
        o = self.options
        loss = F.cross_entropy(logits, y)
        if o.cd_target == "exact":  # line 12, as weights; "cached" keeps only their output p_prev
            self.previous_weights = {name: w.detach().clone() for name, w in self.model.state_dict().items()}
        self.update(loss)  # lines 11 and 13
        p_prev = F.softmax(logits.detach().float(), dim=1)
        if o.reuse_grad:
            # At w~ and this theta, p = p_prev, so grad J_cd = (lam - rho) * grad CE (decision 3).
            self.pending_grad = (o.lam - o.rho) * x_adv.grad
        if o.mh_start == "reuse":  # U at the next replay's start, by the weights before this step
            self.pending_potential = -cd_objective(logits.detach(), y, p_prev, lam=o.lam, rho=o.rho)
        return loss.detach(), p_prev

    def _p_prev(self, x_adv, p_prev):
        if p_prev is None or self.options.cd_target == "cached":
            return p_prev
        with torch.no_grad():  # exact: the previous weights evaluated at this theta
            previous = lambda inputs: functional_call(self.model, self.previous_weights, (inputs,))  # noqa: E731
            return F.softmax(self._net(previous, x_adv).float(), dim=1)

    def _cd_grad_and_potential(self, x, delta, y, p_prev):
        """One pass: grad_theta J_cd at theta = x + delta (= -grad U, what the kick climbs), and
        U = -J_cd there, per example."""
        x_adv = (x + delta).detach().requires_grad_(True)
        logits = self._net(self.model, x_adv)
        j = cd_objective(logits, y, self._p_prev(x_adv.detach(), p_prev), lam=self.options.lam, rho=self.options.rho)
        (grad,) = torch.autograd.grad(j.sum(), x_adv)
        return grad, -j.detach()

    def _potential(self, x, delta, y, p_prev):
        """U = -J_cd at theta = x + delta by the current weights: a forward, no backward."""
        with torch.no_grad():
            x_adv = x + delta
            logits = self._net(self.model, x_adv)
            return -cd_objective(logits, y, self._p_prev(x_adv, p_prev), lam=self.options.lam, rho=self.options.rho)

    def _net(self, net, x_adv):
        """``net(x_adv)``; in a replay of a dropout network, with the replay's dropout masks (the
        default generator forked and seeded alike for every forward, then restored)."""
        if self.replay_seed is None:
            return net(x_adv)
        with torch.random.fork_rng(devices=[x_adv.device] if x_adv.is_cuda else []):
            torch.manual_seed(self.replay_seed)
            return net(x_adv)

    def state_dict(self):
        state = {"delta": self.delta, "v": self.v, "pending_grad": self.pending_grad}
        return {k: t for k, t in state.items() if t is not None}

    def load_state_dict(self, state):
        self.delta, self.v, self.pending_grad = state.get("delta"), state.get("v"), state.get("pending_grad")
