"""Fast-FGSM (Wong, Rice & Kolter 2020, "Fast is better than free").

FGSM from a uniform random start with step alpha = 1.25 * eps, usually with a cyclic learning
rate. Optional early stop as the official code: after each epoch, PGD-5 accuracy on the first
training batch; a drop of more than ``early_stop_drop`` signals catastrophic overfitting: training
stops with the weights of the epoch before.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..attacks import input_grad, pgd
from ..threat import default_step, project, uniform_start
from .base import Method, accuracy


@dataclass
class FastOptions:
    alpha_factor: float = 1.25
    early_stop: bool = False
    early_stop_drop: float = 0.2

    def validate(self):
        if self.alpha_factor <= 0:
            raise ValueError("alpha_factor must be > 0")


class FastFGSM(Method):
    Options = FastOptions

    def __init__(self, *args):
        super().__init__(*args)
        self.previous_robust_acc = 0.0
        self.best_state: dict | None = None

    @staticmethod
    def passes(options):
        return 2  # the FGSM step and the training pass

    def step(self, x, y):
        delta = uniform_start(x, self.eps)
        grad, _ = input_grad(self.model, x + delta, y)
        delta = project(delta + self.options.alpha_factor * self.eps * grad.sign(), x, self.eps)
        return self.train_on(x + delta, y)

    def end_epoch(self, first_batch):
        if not self.options.early_stop:
            return False
        x, y = first_batch
        x_adv = pgd(self.model, x, y, self.eps, alpha=default_step(self.eps), steps=5)
        with torch.no_grad():
            robust_acc = accuracy(self.model(x_adv), y).item()
        if robust_acc - self.previous_robust_acc < -self.options.early_stop_drop:
            self.model.load_state_dict(self.best_state)  # the weights before the collapse
            return True
        self.previous_robust_acc = robust_acc
        self.best_state = copy.deepcopy(self.model.state_dict())
        return False

    def state_dict(self):
        # The last epoch's weights travel with the state: a checkpoint written inside an epoch
        # holds that epoch's weights so far, which are not the ones to roll back to.
        state = {"previous_robust_acc": torch.tensor(self.previous_robust_acc)}
        if self.options.early_stop and self.best_state is not None:
            state.update({f"best.{name}": tensor for name, tensor in self.best_state.items()})
        return state

    def load_state_dict(self, state):
        if "previous_robust_acc" in state:
            self.previous_robust_acc = state["previous_robust_acc"].item()
        best = {name[len("best."):]: tensor.clone() for name, tensor in state.items() if name.startswith("best.")}
        if not best and "previous_robust_acc" in state:  # a checkpoint from before the weights travelled
            best = copy.deepcopy(self.model.state_dict())
        self.best_state = best or None
