"""A whole training run in this process: data, model, method, epochs, checkpoints, final evaluation.

Writes the run directory's files (``run_dir.py`` lists them); rerunning with the same
``out_dir`` and config resumes from ``last.safetensors``. When the group validates apart from
training (``train.val_async`` under Ray), ``validate_checkpoint`` validates each epoch's
checkpoint in a task of its own; the run waits for the last one before its test.

Crash consistency: every file is written whole or not at all (``write_atomic``: temporary file,
fsync, rename, directory fsync). The epoch's metrics record is committed inside its checkpoint
(``meta["history"]``); metrics.jsonl is rewritten from it after each checkpoint, so a kill at any
instant leaves a checkpoint and metrics that agree, and a resume redoes exactly the epochs after
the checkpoint. TensorBoard event files are append-only streams of checksummed records, which
TensorBoard reads up to a torn tail; a resume purges their steps after the checkpoint.

Weight averaging (``train.ema``): an ``engine.EMA`` of the weights follows every optimiser step
and is kept in the checkpoints (a resume continues it bit for bit). Each epoch validates the
average (``val_*_acc``: the one the best checkpoint is chosen by) and the raw weights
(``val_*_acc_raw``); the average's weights go into ``ema.safetensors`` at the end (and into
``best.safetensors`` under ``select_best = robust_val``), and the final test evaluates them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from .board import TensorBoard
from .config import Config
from .core.attacks import build_attack
from .core.checkpoint import Checkpoint, save_checkpoint, write_json_atomic
from .core.engine import EMA, EpochProgress, NonFiniteError, evaluate, train_epoch
from .core.methods import METHODS
from .core.schedules import learning_rate
from .factories import build_optimizer, build_splits_of, default_device, memory_format, model_for, seed_everything
from .group import Group
from .provenance import hardware, provenance
from .resume import resume_from
from .run_dir import (VALIDATIONS, check_not_diverged, rank_file, remove_torn_writes, with_validations,
                      write_history)
from .validation import ema_meta, validation_accuracy, validation_seed

log = logging.getLogger("atcd_ray")


def fit(cfg: Config, out_dir: str | Path, *, progress: bool = True, device: torch.device | None = None,
        group: Group | None = None, publish: Callable[[], None] | None = None) -> dict:
    """Train and test; returns summary.json's contents. ``publish``: called on rank 0 whenever the
    run directory's files have changed (a storage.RunUpload copies them to object storage)."""
    run = Run(cfg, Path(out_dir), group=group or Group(), device=device or default_device(), progress=progress,
              publish=publish)
    run.resume()
    run.train_epochs()
    return run.test()


class Run:
    """One run in this process, stage by stage: set up (data, model, method), resume (this
    config's checkpoint, if any), the epochs (train, validate, commit the checkpoint), the test."""

    def __init__(self, cfg: Config, out: Path, *, group: Group, device: torch.device, progress: bool,
                 publish: Callable[[], None] | None):
        self.cfg, self.out, self.group, self.device = cfg, out, group, device
        self.code = provenance()  # now, not at the end: the checkout may move while the run trains
        self.lead = group.rank == 0
        self.progress = progress and self.lead
        self.publish = publish if self.lead and publish is not None else lambda: None
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed, device)  # same initial weights on every rank
        t = cfg.train
        self.splits = build_splits_of(cfg, device)
        # Fast-FGSM's end-of-epoch check: the same first training batch on every rank.
        self.splits.train.set_epoch(0)
        self.first_batch = tuple(tensor.to(device) for tensor in next(iter(self.splits.train)))
        self.splits.shard(group.rank, group.world_size)
        rank_weight = self.splits.train.local_batch_size * group.world_size / cfg.data.batch_size  # Method.rank_weight
        self.model = model_for(cfg, self.splits.spec).to(device, memory_format=memory_format(t.channels_last))
        # The weight average (train.ema) copies the bare module, before compile and before a method
        # hooks into it; under DDP every rank averages its own, rank 0's is checkpointed.
        self.ema = EMA(self.model, t.ema) if t.ema else None
        self.optimizer = build_optimizer(cfg, self.model)
        if self.ema is not None:
            self.ema.follow(self.optimizer, self.model)  # after every optimiser step, however many a method takes
        if t.compile:
            self.model.compile()  # in place: the module, its state_dict keys and the optimizer's parameters stay
        self.method = METHODS[t.method](group.wrap(self.model, rank_weight), self.optimizer, cfg.eps,
                                        cfg.method_options)
        self.method.rank_weight = rank_weight
        if group.rank:
            torch.manual_seed(cfg.seed + 7919 * group.rank)  # own random starts and chains per rank
        self.total_epochs = cfg.epochs_to_train  # fractional where a budget ends part-way through the last epoch
        self.best_path = out / "best.safetensors"
        # The run's progress, as from scratch; resume() reads it from a checkpoint where there is one.
        self.start_epoch, self.train_seconds, self.best_val, self.history = 0, 0.0, -1.0, []
        self.segments = [self.code]  # the code of every stretch of the run (a resume may run other code)
        self.stopped_early = False
        self.resumed_part: EpochProgress | None = None  # how far the epoch resumed into had got
        self.notices = 0  # checkpoints written on a preemption notice, over the run
        self.stretches: list[list[int]] = []  # this epoch's [first step, workers] per stretch
        self.board: TensorBoard | None = None  # rank 0's, from resume()

    def resume(self) -> None:
        """This config's checkpoint (the run directory's, or the one Ray hands a restarted group):
        weights, optimiser, method state, and the run's records up to it; later epochs are redone."""
        out = self.out
        if self.lead:
            remove_torn_writes(out)
        meta = resume_from(self.group.restore_dir(out), self.cfg, model=self.model, optimizer=self.optimizer,
                           method=self.method, group=self.group, ema=self.ema)
        if self.lead and not meta:  # from scratch: validations found here are of other weights (a directory reused)
            (out / VALIDATIONS).unlink(missing_ok=True)
        check_not_diverged(out)
        if meta:
            self.start_epoch, self.history, self.stopped_early = meta["epoch"], meta["history"], meta["stopped_early"]
            self.train_seconds, self.best_val = meta["train_seconds"], meta["best_val"]
            self.notices = meta.get("preemption_notices", 0)
            segments = meta.get("provenance", [])
            self.segments = segments if segments and segments[-1] == self.code else [*segments, self.code]
        if "epoch_progress" in meta:  # mid-epoch: this rank's images so far (every batch is whole), on any ranks
            self.resumed_part = EpochProgress(**meta["epoch_progress"])
            self.resumed_part.images = self.resumed_part.steps * self.splits.train.local_batch_size
        if self.lead:
            write_history(out, self.history)
            self.board = TensorBoard(out / "tb", self.cfg, self.start_epoch)

    def train_epochs(self) -> None:
        """Each epoch trained, validated (here, or by a task apart under ``train.val_async``) and
        committed with its checkpoint; under ``val_async`` the validations are waited for at the end."""
        for epoch in range(self.start_epoch, 0 if self.stopped_early else self.cfg.train.epochs):
            record = self.train_one_epoch(epoch)
            val = self.validate(epoch, record)
            self.commit(epoch, record, val)
            if self.stopped_early:
                log.info("early stop after epoch %d (PGD accuracy on a training batch collapsed)", epoch + 1)
                break
        if self.group.validates_async:  # the best checkpoint and the records need every validation
            self.group.wait_for_validations()
            if self.lead:  # the other ranks test rank 0's choice (share_weights) and write nothing
                self.history = with_validations(self.out, self.history)
                missing = [r["epoch"] for r in self.history if "val_robust_acc" not in r and (
                    r["epoch"] % self.cfg.train.val_every == 0 or r is self.history[-1])]
                if missing:  # a failed validation task (Ray logged why): the choice is among the others
                    log.warning("epochs %s have no validation; best.safetensors is chosen among the others", missing)
                write_history(self.out, self.history)

    def train_one_epoch(self, epoch: int) -> dict:
        """One epoch's training (its first steps only where the budget ends inside it); its record."""
        t, group, resumed = self.cfg.train, self.group, self.resumed_part
        # Which steps of this epoch ran on how many workers: [first step, workers] per stretch.
        self.stretches = list(resumed.stretches) if resumed else []
        if not self.stretches or self.stretches[-1][1] != group.world_size:
            self.stretches.append([resumed.steps if resumed else 0, group.world_size])
        partial = epoch + 1 > self.total_epochs + 1e-9  # the budget's last, part-way epoch: its first steps
        max_steps = max(1, round((self.total_epochs - epoch) * len(self.splits.train))) if partial else None
        try:
            stats = train_epoch(self.method, self.splits.train, epoch=epoch, total_epochs=self.total_epochs,
                                set_lr=self.set_lr, device=self.device, amp=t.amp, progress=self.progress,
                                channels_last=t.channels_last, pin_memory=self.cfg.data.pin_memory,
                                world_size=group.world_size, progress_interval=t.progress_seconds, resumed=resumed,
                                checkpoint_steps=t.checkpoint_steps,
                                checkpoint=lambda progress: self.checkpoint_inside(epoch, progress),
                                checkpoint_now=self.checkpoint_now, max_steps=max_steps)
            self.resumed_part = None
            check_finite_weights(self.model, epoch)
        except NonFiniteError as err:  # no checkpoint of this epoch: the last good one stays
            if self.lead:
                write_json_atomic(self.out / "diverged.json", {"error": str(err)})
                self.publish()
            raise
        stats["images_per_second"] = group.sum([stats["images_per_second"]])[0]
        self.train_seconds += stats["epoch_seconds"]
        with torch.random.fork_rng(devices=[]):  # same decision on every rank, same training stream
            torch.manual_seed(self.cfg.seed + epoch)
            self.stopped_early = self.method.end_epoch(self.first_batch)
        if self.stopped_early and self.ema is not None:
            # The method rolled the weights back to the last epoch's end (Fast-FGSM's collapse); the
            # average of the collapsed epoch would carry the collapse: it restarts from those weights.
            self.ema.module.load_state_dict(self.model.state_dict())
            log.warning("early stop: the weight average restarts from the rolled-back weights")
        return {"epoch": epoch + 1, "budget_spent": min(epoch + 1, self.total_epochs) * self.cfg.passes_per_minibatch,
                **{f"train_{k}": v for k, v in stats.items()}, "train_stretches": self.stretches,
                "train_seconds": self.train_seconds, "finished_at": time.time()}

    def validates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (from 0) is validated: every ``train.val_every``-th, and the last."""
        t = self.cfg.train
        return (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs or self.stopped_early

    def validate(self, epoch: int, record: dict) -> dict | None:
        """The epoch's validation here, between epochs, into ``record``; its accuracies (of the
        weight average under ``train.ema``), or None where a task validates it or none is due."""
        if self.group.validates_async or not self.validates(epoch):
            return None
        started = time.perf_counter()
        val = self.validation_accuracy(self.model)
        if self.ema is not None:  # the raw weights from the training stream, as without ema; the average apart
            record.update(val_clean_acc_raw=val["clean"], val_robust_acc_raw=val["robust"])
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(validation_seed(self.cfg, epoch + 1))
                val = self.validation_accuracy(self.ema.module)
        record.update(val_clean_acc=val["clean"], val_robust_acc=val["robust"],
                      val_seconds=time.perf_counter() - started)
        return val

    def validation_accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        splits = self.splits
        return mean_over_ranks(self.group, validation_accuracy(self.cfg, model, splits, self.device),
                               splits.val.num_examples)

    def commit(self, epoch: int, record: dict, val: dict | None) -> None:
        """The epoch's checkpoint (its record inside), best.safetensors if it improved, the
        records and TensorBoard; then the report to the group (Ray)."""
        improved = val is not None and self.cfg.train.select_best == "robust_val" and val["robust"] > self.best_val
        if improved:
            self.best_val = val["robust"]
        self.history.append(record)
        if self.lead and improved:
            best_weights = self.model if self.ema is None else self.ema.module
            save_checkpoint(self.best_path, best_weights, config=self.cfg.to_dict(),
                            meta={"epoch": epoch + 1, "val": val, **ema_meta(self.cfg)})
        own = self.save_state(epoch + 1)  # the epoch's record is committed with it
        if self.lead:
            write_history(self.out, self.history)
            self.board.epoch(record)
            self.publish()
        self.group.report(record, own, validate=self.group.validates_async and self.validates(epoch))
        if self.lead:
            log.info("epoch %d/%d  %s", epoch + 1, self.cfg.train.epochs, "  ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k in (
                    "train_loss", "train_mh_accept_rate", "val_clean_acc", "val_robust_acc", "val_robust_acc_raw",
                    "train_images_per_second")))

    def set_lr(self, epoch: float) -> float:
        o = self.cfg.optim
        lr = learning_rate(o.schedule, o.lr, epoch, self.total_epochs, milestones=o.milestones, gamma=o.gamma,
                           peak_fraction=o.warmup_fraction)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        return lr

    def save_state(self, epochs_done: int, progress: EpochProgress | None = None) -> Path:
        """Rank 0 writes the group's checkpoint (weights, optimiser, and the meta that commits the
        history), every rank its own method state and RNG; ``progress``: how far the next epoch
        got, for a checkpoint inside it. Returns this rank's file."""
        own = self.out / rank_file(self.group.rank)
        if self.lead:
            meta = {"epoch": epochs_done, "world_size": self.group.world_size, "train_seconds": self.train_seconds,
                    "best_val": self.best_val, "preemption_notices": self.notices,
                    "stopped_early": self.stopped_early, "history": self.history, "provenance": self.segments,
                    **({"epoch_progress": dataclasses.asdict(progress)} if progress else {})}
            save_checkpoint(own, self.model, config=self.cfg.to_dict(), meta=meta, optimizer=self.optimizer,
                            method_state=self.method.state_dict(), rng_state=torch.get_rng_state(),
                            keep_previous=True, ema=self.ema)
        else:
            save_checkpoint(own, None, config={}, meta={"epoch": epochs_done}, method_state=self.method.state_dict(),
                            rng_state=torch.get_rng_state())
        return own

    def checkpoint_inside(self, epoch: int, progress: EpochProgress) -> None:
        progress.stretches = self.stretches
        record = {"epoch": epoch, "step_in_epoch": progress.steps,
                  "train_seconds": self.train_seconds + progress.seconds}
        self.group.report(record, self.save_state(epoch, progress))
        self.publish()

    def checkpoint_now(self, steps: int) -> bool:
        """Every ``train.preemption_check_steps`` steps: whether a preemption notice asks for a checkpoint."""
        if steps % self.cfg.train.preemption_check_steps or not self.group.preempted():
            return False
        self.notices += 1
        return True

    def test(self) -> dict:
        """The chosen weights (best.safetensors under ``select_best = robust_val``, else the last or
        the average) on the test split, every rank its share; summary.json."""
        final = self.out / "last.safetensors"
        if self.ema is not None:  # the average's weights, for the test here and any evaluation later
            final = self.out / "ema.safetensors"
            if self.lead:
                save_checkpoint(final, self.ema.module, config=self.cfg.to_dict(), meta={
                    "epoch": len(self.history), **ema_meta(self.cfg), "n_averaged": int(self.ema.n_averaged)})
                self.publish()
        robust_val = self.cfg.train.select_best == "robust_val" and self.best_path.exists()
        chosen = self.best_path if robust_val else final
        if self.lead:
            self.model.load_state_dict(Checkpoint(chosen).model_state())
        self.group.share_weights(self.model)  # every rank tests rank 0's choice, without reading rank 0's files
        start = time.perf_counter()
        attacks = {name: build_attack(name, self.cfg.eps) for name in self.cfg.eval.attacks}
        test = mean_over_ranks(self.group, evaluate(
            self.model, self.splits.test, attacks, self.device, amp=self.cfg.eval.amp, progress=self.progress,
            channels_last=self.cfg.train.channels_last), self.splits.test.num_examples)
        summary = self.summary(test, chosen, eval_seconds=time.perf_counter() - start)
        if self.lead:
            self.board.close(summary)
            # sorted keys: the reports' attack columns follow robust_acc's order
            write_json_atomic(self.out / "summary.json", summary, sort_keys=True)
            self.publish()
        return summary

    def summary(self, test: dict[str, float], chosen: Path, eval_seconds: float) -> dict:
        cfg, t, history, segments = self.cfg, self.cfg.train, self.history, self.segments
        return {
            "dataset": cfg.dataset, "method": t.method, "model": cfg.model, "eps": cfg.eps, "seed": cfg.seed,
            "config": cfg.to_dict(), "clean_acc": test["clean"],
            "robust_acc": {name: test[name] for name in cfg.eval.attacks},
            "train_seconds": self.train_seconds, "eval_seconds": eval_seconds,
            "epochs": len(history), "stopped_early": self.stopped_early, "checkpoint": chosen.name, "ema": t.ema,
            "eval_n": int(self.group.sum([float(self.splits.test.num_examples)])[0]),
            "workers": self.group.world_size, "preemption_notices": self.notices,
            "final_epoch": history[-1] if history else {},
            # Compute in natural-epoch equivalents: passes over the training set, epochs actually run.
            "passes_per_minibatch": cfg.passes_per_minibatch,
            "budget": min(len(history), self.total_epochs) * cfg.passes_per_minibatch,
            "train_examples": self.splits.train.size,
            "hardware": hardware(), "provenance": {**segments[-1], "earlier": segments[:-1]} if len(segments) > 1
            else segments[-1],
        }


def mean_over_ranks(group: Group, accuracy: dict[str, float], n: int) -> dict[str, float]:
    """Accuracies of the whole split from each rank's accuracy on its shard of n examples."""
    names = list(accuracy)
    totals = group.sum([accuracy[k] * n for k in names] + [float(n)])
    return {k: totals[i] / max(totals[-1], 1.0) for i, k in enumerate(names)}


def check_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"non-finite values in {name} after epoch {epoch + 1}")
