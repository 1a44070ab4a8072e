"""The process group a run trains in, as the run loop sees it (one process by default; Ray
Train's workers in ``atcd_ray.distributed``)."""
from __future__ import annotations

from pathlib import Path

import torch

from .core.checkpoint import previous_path


class Group:
    """This process's place in a data-parallel group, and what the training loop asks of it.

    The default is a single process that keeps its checkpoints in the run directory. The Ray
    Train worker (``atcd_ray.distributed``) overrides ``wrap`` (DDP), ``restore_dir`` (the
    latest checkpoint Ray hands a restarted group), ``report`` (the checkpoint to Ray) and
    ``preempted`` (Ray's preemption notice); with ``validates_async`` it validates each epoch's
    checkpoint apart from training (``report(..., validate=True)``, ``wait_for_validations``)."""

    rank, world_size = 0, 1
    validates_async = False

    def wrap(self, model: torch.nn.Module, rank_weight: float = 1.0) -> torch.nn.Module:
        """The model the training loss goes through; ``rank_weight``: ``Method.rank_weight``."""
        return model

    def restore_dir(self, out: Path) -> Path | None:
        """Where the checkpoint to resume from lies, or None for a fresh start."""
        last = out / "last.safetensors"
        return out if last.exists() or previous_path(last).exists() else None

    def report(self, record: dict, checkpoint_file: Path, validate: bool = False) -> None:
        """Called on every rank at each checkpoint (after each epoch, and inside epochs), once its
        checkpoint file is written; a record inside an epoch has no validation metrics, nor has an
        epoch's under ``validates_async`` (``validate``: the checkpoint is to be validated)."""

    def wait_for_validations(self) -> None:
        """Under ``validates_async``: returns once every reported checkpoint is validated."""

    def preempted(self) -> bool:
        """Whether a preemption notice has come that no checkpoint has answered yet. Called on
        every rank at the same steps (every ``train.preemption_check_steps``)."""
        return False

    def share_weights(self, model: torch.nn.Module) -> None:
        """Rank 0's weights (and buffers) on every rank."""
        if self.world_size > 1:
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()
