"""Natural (standard) training: cross-entropy on clean inputs."""
from __future__ import annotations

from .base import Method


class Natural(Method):
    def step(self, x, y):
        return self.train_on(x, y)
