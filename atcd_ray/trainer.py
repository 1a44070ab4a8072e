"""A whole training run in this process: data, model, method, epochs, checkpoints, final evaluation.

Writes into ``out_dir``: ``metrics.jsonl`` (one line per epoch), ``last.safetensors`` every
epoch, ``best.safetensors`` when ``select_best = robust_val``, and ``summary.json`` at the end.
Rerunning with the same ``out_dir`` and config resumes from ``last.safetensors``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .core.attacks import build_attack
from .core.checkpoint import Checkpoint, save_checkpoint
from .core.engine import evaluate, train_epoch
from .core.methods import METHODS
from .core.models import build_model
from .core.schedules import learning_rate
from .data import DatasetSpec, build_splits

log = logging.getLogger("atcd_ray")


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_for(cfg: Config, spec: DatasetSpec) -> torch.nn.Module:
    return build_model(cfg.model, spec.num_classes, spec.in_channels, spec.mean, spec.std)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    info = {"torch": torch.__version__, "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _resume(path: Path, cfg: Config, model, optimizer, method) -> dict:
    """Load ``last.safetensors`` if it belongs to this very config; returns its meta (or {})."""
    if not path.exists():
        return {}
    ckpt = Checkpoint(path)
    if ckpt.config != json.loads(cfg.to_json()):
        raise RuntimeError(f"{path} was written by another config; use a fresh --out directory")
    model.load_state_dict(ckpt.model_state())
    optimizer.load_state_dict(ckpt.optimizer_state())
    method.load_state_dict(ckpt.method_state())
    if "rng.cpu" in ckpt.tensors:
        torch.set_rng_state(ckpt.tensors["rng.cpu"])
    log.info("resuming from %s after epoch %d", path, ckpt.meta["epoch"])
    return ckpt.meta


def fit(cfg: Config, out_dir: str | Path, progress: bool = True, device: torch.device | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or default_device()
    seed_everything(cfg.seed, device)
    d, t, o = cfg.data, cfg.train, cfg.optim
    splits = build_splits(cfg.dataset, d.dir, d.batch_size, d.val_size, d.subset, cfg.eval.n, t.val_n,
                          cfg.seed, d.loader_workers)
    model = model_for(cfg, splits.spec).to(device)
    optimizer = build_optimizer(cfg, model)
    method = METHODS[t.method](model, optimizer, cfg.eps, cfg.method_options)

    last_path, best_path, metrics_path = out / "last.safetensors", out / "best.safetensors", out / "metrics.jsonl"
    meta = _resume(last_path, cfg, model, optimizer, method)
    start_epoch = meta.get("epoch", 0)
    train_seconds, best_val = meta.get("train_seconds", 0.0), meta.get("best_val", -1.0)
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    history = [h for h in history if h["epoch"] <= start_epoch]  # epochs after the checkpoint are redone
    metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    def set_lr(epoch: float) -> float:
        lr = learning_rate(o.schedule, o.lr, epoch, t.epochs, o.milestones, o.gamma, o.warmup_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    val_attacks = {"robust": build_attack(t.val_attack, cfg.eps)}
    splits.train.set_epoch(0)
    first_batch = tuple(tensor.to(device) for tensor in next(iter(splits.train)))
    stopped_early = meta.get("stopped_early", False)
    for epoch in range(start_epoch, 0 if stopped_early else t.epochs):
        stats = train_epoch(method, splits.train, epoch, t.epochs, set_lr, device, t.amp, progress)
        train_seconds += stats["epoch_seconds"]
        stopped_early = method.end_epoch(first_batch)
        val = evaluate(model, splits.val, val_attacks, device, t.amp)
        record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()},
                  "val_clean_acc": val["clean"], "val_robust_acc": val["robust"], "train_seconds": train_seconds}
        if t.select_best == "robust_val" and val["robust"] > best_val:
            best_val = val["robust"]
            save_checkpoint(best_path, model, cfg.to_dict(), {"epoch": epoch + 1, "val": val})
        meta = {"epoch": epoch + 1, "train_seconds": train_seconds, "best_val": best_val, "stopped_early": stopped_early}
        save_checkpoint(last_path, model, cfg.to_dict(), meta, optimizer, method.state_dict(), torch.get_rng_state())
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        history.append(record)
        log.info("epoch %d/%d  %s", epoch + 1, t.epochs, "  ".join(
            f"{k}={v:.4g}" for k, v in record.items() if k in (
                "train_loss", "train_mh_accept_rate", "val_clean_acc", "val_robust_acc", "train_images_per_second")))
        if stopped_early:
            log.info("early stop after epoch %d (PGD accuracy on a training batch collapsed)", epoch + 1)
            break

    chosen = best_path if t.select_best == "robust_val" and best_path.exists() else last_path
    model.load_state_dict(Checkpoint(chosen).model_state())
    start = time.perf_counter()
    attacks = {name: build_attack(name, cfg.eps) for name in cfg.eval.attacks}
    test = evaluate(model, splits.test, attacks, device, t.amp, progress)
    summary = {
        "dataset": cfg.dataset, "method": t.method, "model": cfg.model, "eps": cfg.eps, "seed": cfg.seed,
        "config": cfg.to_dict(), "clean_acc": test["clean"],
        "robust_acc": {name: test[name] for name in attacks},
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
        "epochs": len(history), "stopped_early": stopped_early, "checkpoint": chosen.name,
        "eval_n": splits.test.num_examples,
        "final_epoch": history[-1] if history else {}, "hardware": hardware(),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
