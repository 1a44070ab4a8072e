"""Validation: an epoch's clean and robust accuracy on the held-out split, between epochs (in the
run loop) or apart from training on the epoch's checkpoint (a Ray task under ``train.val_async``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .board import TensorBoard
from .config import Config
from .core.attacks import build_attack
from .core.checkpoint import Checkpoint, save_checkpoint, write_text_atomic
from .core.engine import evaluate
from .factories import build_splits_of, memory_format, model_for
from .run_dir import VALIDATIONS, read_validations


def validation_accuracy(cfg: Config, model: torch.nn.Module, splits, device: torch.device) -> dict[str, float]:
    """Clean and robust (``train.val_attack``) accuracy on this process's share of the validation split."""
    attacks = {"robust": build_attack(cfg.train.val_attack, cfg.eps)}
    return evaluate(model, splits.val, attacks, device, amp=cfg.eval.amp, channels_last=cfg.train.channels_last)


def validate_checkpoint(cfg: Config, checkpoint_file: Path, out: Path, device: torch.device, *, splits=None) -> dict:
    """An epoch's validation apart from training (a Ray task under ``train.val_async``), on the
    checkpoint the workers wrote after it: its record goes into DIR/validation.jsonl and
    TensorBoard, and its weights into best.safetensors when it beats the earlier epochs (under
    ``select_best = robust_val``). Ray runs these one at a time, in epoch order, so the files see
    no concurrent writer. The attack's draws are seeded from (seed, epoch): rerunning a
    validation gives the same record, which replaces the first; TensorBoard gets an epoch once.
    ``splits``: ``build_splits_of``'s, when the caller keeps them between validations. Returns
    the epoch's whole record, validation included. Under ``train.ema`` the weight average is
    validated (``val_*_acc``, and best.safetensors holds its weights) and the raw weights beside
    it (``val_*_acc_raw``), each from the same seed."""
    started = time.time()
    ckpt = Checkpoint(checkpoint_file)
    epoch = ckpt.meta["epoch"]
    splits = splits or build_splits_of(cfg, device)
    model = model_for(cfg, splits.spec).to(device, memory_format=memory_format(cfg.train.channels_last))
    model.load_state_dict(ckpt.model_state())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(validation_seed(cfg, epoch))
        val = validation_accuracy(cfg, model, splits, device)
    record: dict = {"epoch": epoch}
    if cfg.train.ema:
        model.load_state_dict(ckpt.averaged_model_state())  # from here on the model is the average
        record.update(val_clean_acc_raw=val["clean"], val_robust_acc_raw=val["robust"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(validation_seed(cfg, epoch))
            val = validation_accuracy(cfg, model, splits, device)
    record.update(val_clean_acc=val["clean"], val_robust_acc=val["robust"], val_started_at=started,
                  val_finished_at=time.time())
    record["val_seconds"] = record["val_finished_at"] - started
    validated = read_validations(out)
    repeated = epoch in validated
    best = max((r["val_robust_acc"] for e, r in validated.items() if e < epoch), default=-1.0)
    if cfg.train.select_best == "robust_val" and record["val_robust_acc"] > best:
        save_checkpoint(out / "best.safetensors", model, config=cfg.to_dict(),
                        meta={"epoch": epoch, "val": val, **ema_meta(cfg)})
    if not repeated:  # before the record: a kill in between may repeat a point, never lose one
        from torch.utils.tensorboard import SummaryWriter

        # A directory of its own: TensorBoard's loaders follow one growing events file per directory.
        with SummaryWriter(str(out / "tb" / "validation")) as writer:
            for key in ("val_clean_acc", "val_robust_acc", "val_clean_acc_raw", "val_robust_acc_raw"):
                if key in record:
                    writer.add_scalar(TensorBoard.SCALARS[key], record[key], epoch)
    validated[epoch] = record
    write_text_atomic(out / VALIDATIONS, "".join(json.dumps(validated[e]) + "\n" for e in sorted(validated)))
    trained = ckpt.meta.get("history") or [{}]  # an epoch's checkpoint: its history ends with the epoch
    return {**trained[-1], **record}


def validation_seed(cfg: Config, epochs_done: int) -> int:
    """The seed of a validation drawn apart from the training stream: a task's under
    ``train.val_async``, the weight average's between epochs."""
    return cfg.seed * 1_000_003 + epochs_done


def ema_meta(cfg: Config) -> dict:
    """What a file of weights says of them under ``train.ema``: they are the average, of that decay."""
    return {"ema": cfg.train.ema} if cfg.train.ema else {}
