"""Resuming a run from its checkpoint: the weights, optimiser and weight average, each rank's
method state and RNG, re-cut by rows when the group changed size (elastic training)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import Config
from .core.checkpoint import Checkpoint, load_latest
from .core.engine import EMA
from .group import Group
from .run_dir import check_same_config, rank_file

log = logging.getLogger("atcd_ray")


def resume_from(directory: Path | None, cfg: Config, *, model, optimizer, method, group: Group,
                ema: EMA | None = None) -> dict:
    """Load the checkpoint in ``directory`` if it belongs to this very config; returns its meta.

    Per-rank state (a persistent perturbation, an ATCD chain, the RNG) comes from this rank's own
    file when the group has the checkpoint's size. After an elastic resize, the per-example state
    of all the old ranks is re-cut by rows for the new ones (``reshard_rows``: the same global
    rows, so a chain continues as it would have), and each rank's RNG is seeded afresh from
    (seed, rank, position): random draws are the one thing a resize changes."""
    if directory is None:
        return {}
    ckpt = load_latest(directory / "last.safetensors")
    check_same_config(ckpt.path, ckpt.config, cfg)
    model.load_state_dict(ckpt.model_state())
    optimizer.load_state_dict(ckpt.optimizer_state())
    if ema is not None:  # rank 0's average on every rank (the ranks' BatchNorm statistics differ)
        ema.load_state_dict(ckpt.ema_state())
    rank, old_world, per_example = group.rank, ckpt.meta.get("world_size", group.world_size), method.per_example_state
    files = [ckpt.path] + [directory / rank_file(r) for r in range(1, old_world)]
    if old_world == group.world_size and files[rank].exists():
        own = ckpt if rank == 0 else Checkpoint(files[rank])
        method.load_state_dict(own.method_state())
        if "rng.cpu" in own.tensors:
            torch.set_rng_state(own.tensors["rng.cpu"])
    else:  # resized, or this rank's file is missing
        if per_example and all(f.exists() for f in files):
            states = [ckpt.method_state()] + [Checkpoint(f).method_state() for f in files[1:]]
            method.load_state_dict(reshard_rows(states, per_example, rank, group.world_size))
        else:  # what every rank shares (Fast-FGSM's), from rank 0: ranks must take the same decisions
            method.load_state_dict({k: v for k, v in ckpt.method_state().items() if k not in per_example})
            if per_example:
                log.warning("rank %d: no per-example state for it in %s; its chain starts afresh", rank, directory)
        position = ckpt.meta["epoch"] * 1_000_003 + ckpt.meta.get("epoch_progress", {}).get("steps", 0)
        torch.manual_seed(((cfg.seed * 7919 + rank) * 1_000_033 + position) % 2**63)
        if rank == 0 and old_world != group.world_size:
            log.info("resized from %d to %d workers%s", old_world, group.world_size,
                     ": per-example method state re-cut by rows" if per_example else "")
    inside = ckpt.meta.get("epoch_progress")
    log.info("resuming from %s after epoch %d%s", ckpt.path, ckpt.meta["epoch"],
             f", step {inside['steps']} of epoch {ckpt.meta['epoch'] + 1}" if inside else "")
    return ckpt.meta


def reshard_rows(states: list[dict[str, torch.Tensor]], per_example: tuple[str, ...], rank: int,
                 world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``world_size``'s method state from the states of the ranks of an earlier
    group (in rank order). Old rank r held rows r, r + w, ... of the global minibatch
    (``Sharded.rows``); the global rows are put back together and the new rank takes its own.
    Other entries (the same on every rank, like Fast-FGSM's) come from old rank 0."""
    old_world = len(states)
    state = dict(states[0])
    for key in per_example:
        parts = [s.get(key) for s in states]
        if any(p is None for p in parts):
            state.pop(key, None)
            continue
        rows = sum(len(p) for p in parts)
        whole = parts[0].new_empty((rows, *parts[0].shape[1:]))
        for r, part in enumerate(parts):
            whole[r::old_world] = part
        state[key] = whole[rank::world_size].clone()
    return state
