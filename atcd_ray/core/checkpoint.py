"""Self-describing checkpoints in one safetensors file: model weights, optimiser and method
state as tensors, the config and counters as JSON metadata. Loading never unpickles anything.

Writes are atomic (``write_atomic``): a temporary file in the same directory, fsynced, renamed
over the target, then the directory fsynced, so a crash or power loss leaves either the old file
or the new one, never half of one. ``keep_previous`` keeps the checkpoint being replaced as
``NAME.previous.safetensors``; ``load_latest`` falls back to it, with one warning line, when the
latest cannot be read (a disk that tore it, a copy cut short).

Under ``train.ema`` a training checkpoint also holds the weight average (``engine.EMA``'s state:
``ema.n_averaged`` and ``ema.module.*``) beside the raw weights (``model.*``), which training
resumes from; the files written for evaluation (``ema.safetensors``, ``best.safetensors``) hold
the average's weights as ``model.*``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "atcd_ray/1"
log = logging.getLogger("atcd_ray")


class CheckpointError(ValueError):
    """A file that is not a whole atcd_ray checkpoint; the message names it."""


def _unreadable(path: str | Path, err: Exception) -> CheckpointError:
    """safetensors' error on a torn or foreign file, as one line naming it."""
    return CheckpointError(f"{path} is not a readable safetensors checkpoint ({type(err).__name__}: "
                           f"{' '.join(str(err).split())})")


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the entry lives in the directory's data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[str], None], previous: Path | None = None) -> Path:
    """``write(tmp_name)`` writes the content; it becomes ``path`` only once whole and on disk.
    ``previous``: where the file being replaced goes (it stays whole there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)  # a crash right after this leaves previous, still whole
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``data`` as JSON, one line where ``indent`` is None (a JSON-lines record), ending in a newline."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".previous.safetensors")


def _flatten(prefix: str, tree: Any, tensors: dict, plain: dict) -> None:
    """Tensors of a nested dict go to ``tensors`` under dotted keys; everything else to ``plain``."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous().clone()
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, tensors, plain)
    else:
        plain[prefix] = tree


def save_checkpoint(path: str | Path, model: torch.nn.Module | None, *, config: dict, meta: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, method_state: dict | None = None,
                    rng_state: torch.Tensor | None = None, keep_previous: bool = False,
                    ema: torch.nn.Module | None = None) -> Path:
    """``ema``: the weight average (``engine.EMA``) to keep beside the weights, under ``ema.*``."""
    path = Path(path)
    tensors, plain = {}, {}
    if model is not None:
        _flatten("model", model.state_dict(), tensors, plain)
    if ema is not None:
        _flatten("ema", ema.state_dict(), tensors, plain)
    if optimizer is not None:
        _flatten("optim", optimizer.state_dict(), tensors, plain)
    _flatten("method", method_state or {}, tensors, plain)
    if rng_state is not None:  # so that a resumed run draws the same random numbers
        tensors["rng.cpu"] = rng_state.clone()
    metadata = {"format": FORMAT, "config": json.dumps(config), "meta": json.dumps(meta or {}), "plain": json.dumps(plain)}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata),
                        previous=previous_path(path) if keep_previous else None)


def save_weights_only(source: str | Path, path: str | Path) -> Path:
    """A copy of checkpoint ``source`` with its model's tensors, config and counters only (no
    optimizer, method or RNG state): what evaluating or serving it needs, at about a third of
    the size. It cannot resume training."""
    checkpoint = Checkpoint(source)
    tensors = {k: v for k, v in checkpoint.tensors.items() if k.startswith("model.")}
    plain = {k: v for k, v in checkpoint.plain.items() if k.startswith("model.")}
    metadata = {"format": FORMAT, "config": json.dumps(checkpoint.config), "meta": json.dumps(checkpoint.meta),
                "plain": json.dumps(plain)}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_latest(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``, or the one it replaced if ``path`` is absent or unreadable. An
    unreadable one is set aside as ``NAME.corrupt`` (kept for inspection), so that the next save
    does not rotate it over the good previous checkpoint."""
    path, previous = Path(path), previous_path(path)
    try:
        return Checkpoint(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file: a torn write, a truncated copy
        if not previous.exists():
            raise
        if path.exists():
            log.warning("%s is unreadable (%s: %s); resuming from %s", path, type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "", previous.name)
            os.replace(path, path.with_name(path.name + ".corrupt"))
        return Checkpoint(previous)


def checkpoint_config(path: str | Path) -> dict:
    """The config a checkpoint was written with, read from its header alone (no tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["config"])
    except Exception as err:  # noqa: BLE001 - a torn or foreign file
        raise _unreadable(path, err) from None


class Checkpoint:
    """A loaded checkpoint: ``config`` and ``meta`` dicts and tensors grouped by owner."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise CheckpointError(f"{self.path} is not an atcd_ray checkpoint "
                                          f"(format {metadata.get('format')!r})")
                self.tensors = {key: f.get_tensor(key) for key in f.keys()}
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors' errors on a torn or foreign file
            raise _unreadable(self.path, err) from None
        self.config = json.loads(metadata["config"])
        self.meta = json.loads(metadata["meta"])
        self.plain = json.loads(metadata["plain"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        start = prefix + "."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.group("model")

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The weight average's ``state_dict`` (``engine.EMA``; empty without ``train.ema``)."""
        return self.group("ema")

    def averaged_model_state(self) -> dict[str, torch.Tensor]:
        """The weight average's weights, keyed like ``model_state`` (empty without ``train.ema``)."""
        return {k[len("module."):]: v for k, v in self.ema_state().items() if k.startswith("module.")}

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
