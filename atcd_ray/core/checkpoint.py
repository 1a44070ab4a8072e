"""Self-describing checkpoints in one safetensors file: model weights, optimiser and method
state as tensors, the config and counters as JSON metadata. Loading never unpickles anything.

Writes are atomic: a temporary file in the same directory, fsynced, then renamed over the target,
so a crash leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "atcd_ray/1"


def _flatten(prefix: str, tree: Any, tensors: dict, plain: dict) -> None:
    """Tensors of a nested dict go to ``tensors`` under dotted keys; everything else to ``plain``."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous().clone()
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, tensors, plain)
    else:
        plain[prefix] = tree


def save_checkpoint(path: str | Path, model: torch.nn.Module | None, config: dict, meta: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, method_state: dict | None = None,
                    rng_state: torch.Tensor | None = None) -> Path:
    path = Path(path)
    tensors, plain = {}, {}
    if model is not None:
        _flatten("model", model.state_dict(), tensors, plain)
    if optimizer is not None:
        _flatten("optim", optimizer.state_dict(), tensors, plain)
    _flatten("method", method_state or {}, tensors, plain)
    if rng_state is not None:  # so that a resumed run draws the same random numbers
        tensors["rng.cpu"] = rng_state.clone()
    metadata = {"format": FORMAT, "config": json.dumps(config), "meta": json.dumps(meta or {}), "plain": json.dumps(plain)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class Checkpoint:
    """A loaded checkpoint: ``config`` and ``meta`` dicts and tensors grouped by owner."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")
        with safe_open(str(self.path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{self.path} is not an atcd_ray checkpoint (format {metadata.get('format')!r})")
            self.tensors = {key: f.get_tensor(key) for key in f.keys()}
        self.config = json.loads(metadata["config"])
        self.meta = json.loads(metadata["meta"])
        self.plain = json.loads(metadata["plain"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        start = prefix + "."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.group("model")

    def optimizer_state(self) -> dict:
        """Rebuild ``optimizer.state_dict()`` from its flattened tensors and JSON leaves."""
        tree: dict = {}
        items = list(self.group("optim").items()) + [
            (k[len("optim."):], v) for k, v in self.plain.items() if k.startswith("optim.")]
        for key, value in items:
            node = tree
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        state = {int(k): v for k, v in sorted(tree.get("state", {}).items(), key=lambda kv: int(kv[0]))}
        return {"state": state, "param_groups": tree.get("param_groups", [])}

    def method_state(self) -> dict[str, torch.Tensor]:
        return self.group("method")
