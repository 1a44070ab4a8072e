"""Natural (standard) training: cross-entropy on clean inputs."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, accuracy


class Natural(Method):
    def step(self, x, y):
        logits = self.loss_model(x)
        loss = F.cross_entropy(logits, y)
        self.update(loss)
        return {"loss": loss.detach(), "train_acc": accuracy(logits, y)}
