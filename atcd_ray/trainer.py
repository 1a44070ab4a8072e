"""A whole training run in this process: data, model, method, epochs, checkpoints, final evaluation.

Writes into ``out_dir``: ``last.safetensors`` every epoch (the one it replaces kept as
``last.previous.safetensors``), ``metrics.jsonl`` (one line per epoch), ``best.safetensors`` when
``select_best = robust_val``, and ``summary.json`` at the end. Rerunning with the same ``out_dir``
and config resumes from ``last.safetensors``. When the group validates apart from training
(``train.val_async`` under Ray), ``validate_checkpoint`` validates each epoch's checkpoint in a
task of its own, records it in ``validation.jsonl`` and writes ``best.safetensors``;
metrics.jsonl takes in the validations done by each epoch's end (``read_history`` merges them on
reading), and the run waits for the last one before its test.

Crash consistency: every file is written whole or not at all (``write_atomic``: temporary file,
fsync, rename, directory fsync). The epoch's metrics record is committed inside its checkpoint
(``meta["history"]``); metrics.jsonl is rewritten from it after each checkpoint, so a kill at any
instant leaves a checkpoint and metrics that agree, and a resume redoes exactly the epochs after
the checkpoint. TensorBoard event files are append-only streams of checksummed records, which
TensorBoard reads up to a torn tail; a resume purges their steps after the checkpoint.

Weight averaging (``train.ema``): an ``engine.EMA`` of the weights follows every optimiser step
and is kept in the checkpoints (a resume continues it bit for bit). Each epoch validates the
average (``val_*_acc``: the one the best checkpoint is chosen by) and the raw weights
(``val_*_acc_raw``); the average's weights go into ``ema.safetensors`` at the end and into
``best.safetensors``, and the final test evaluates them.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import Config, ConfigError
from .core.attacks import build_attack
from .core.checkpoint import (Checkpoint, CheckpointError, checkpoint_config, load_latest, previous_path,
                               save_checkpoint, write_text_atomic)
from .core.engine import EMA, EpochProgress, NonFiniteError, evaluate, train_epoch
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


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.preserve_format


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_history(out: Path) -> list[dict]:
    """A run directory's metrics.jsonl, one record per epoch ([] before the first epoch), with the
    validations done apart from training so far. A torn last line (a file not written by this
    version's atomic writer) is reported and left out."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines):
                raise ValueError(f"{path}, line {i + 1}: not a JSON record") from None
            log.warning("%s: last line is torn (%d characters); ignored", path, len(line))
    return with_validations(out, records)


def write_history(out: Path, history: list[dict]) -> None:
    """metrics.jsonl from the records committed in the checkpoint (atomic, like every run file),
    with the validations done apart from training so far (validation.jsonl) merged in."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in with_validations(out, history)))


VALIDATIONS = "validation.jsonl"
VALIDATION_WRITES = (f".{VALIDATIONS}.", ".best.safetensors.")  # temporary files of validate_checkpoint


def read_validations(out: Path) -> dict[int, dict]:
    """The epochs validated apart from training (``validate_checkpoint``), by epoch."""
    path = out / VALIDATIONS
    return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def with_validations(out: Path, history: list[dict]) -> list[dict]:
    validated = read_validations(out)
    return [{**record, **validated.get(record["epoch"], {})} for record in history]


def check_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"non-finite values in {name} after epoch {epoch + 1}")


def check_not_diverged(out: Path) -> None:
    """A run that stopped on a non-finite value stops again at once: it would diverge the same way."""
    marker = out / "diverged.json"
    if marker.exists():
        error = json.loads(marker.read_text())["error"]
        raise NonFiniteError(f"{out} stopped on a {error}; its last good checkpoint is kept. "
                             "Change the config (another --out) to train again")


def check_resumable(out: Path, cfg: Config) -> None:
    """Before any work: a run directory that holds a checkpoint resumes only under its own config
    (``check_same_config``), read from the checkpoint's header."""
    last = out / "last.safetensors"
    path = last if last.exists() else previous_path(last)
    if not path.exists():
        return
    try:
        old = checkpoint_config(path)
    except CheckpointError:
        return  # unreadable: the resume falls back to the previous checkpoint, or says why not
    check_same_config(path, old, cfg)


def check_same_config(path: Path, old: dict, cfg: Config) -> None:
    """A checkpoint at ``path`` written with config ``old`` resumes only under that config.
    Changing train.epochs alone gets its own answer: the learning-rate schedule is laid over the
    epochs, so a finished run cannot be extended without training something else."""
    new = json.loads(cfg.to_json())
    old, new = _without_operational(old), _without_operational(new)
    if old == new:
        return
    epochs = old.get("train", {}).get("epochs")
    if {**old, "train": {**old.get("train", {}), "epochs": new["train"]["epochs"]}} == new:
        raise ConfigError(f"{path.parent} was started with train.epochs={epochs}, and its learning-rate schedule "
                          f"({old['optim']['schedule']}) is laid over those epochs: it cannot be extended to "
                          f"{new['train']['epochs']}. Resume it with --epochs {epochs}, or train "
                          f"{new['train']['epochs']} epochs in another --out")
    raise ConfigError(f"{path} was written by another config{_config_difference(old, new)}; "
                      "resume with the same config or use a fresh --out directory")


# Keys that change how often a run checkpoints or reports, or what its validation task gets, not
# what it trains: a resume may change them. Not train.val_async: the validation between epochs
# draws PGD's random starts from the training stream, and the two keep their best differently.
OPERATIONAL_KEYS = ("checkpoint_steps", "preemption_check_steps", "progress_seconds", "val_cpus", "val_gpus")


def _without_operational(config: dict) -> dict:
    """What a resume must keep: all but OPERATIONAL_KEYS, and of the methods' options only the
    trained method's (another method's, a default changed by an upgrade say, trains nothing here)."""
    train = config.get("train", {})
    methods = config.get("methods", {})
    # A key added with a default that trains nothing new (train.ema off) matches a checkpoint
    # written before the key existed.
    train = {k: v for k, v in train.items() if k not in OPERATIONAL_KEYS and not (k == "ema" and v is None)}
    return {**config, "train": train,
            "methods": {k: v for k, v in methods.items() if k == train.get("method")}}


def build_splits_of(cfg: Config, device: torch.device):
    d = cfg.data
    return build_splits(cfg.dataset, d.dir, d.batch_size, d.val_size, d.subset, cfg.eval.n, cfg.train.val_n,
                        cfg.seed, d.loader_workers, d.ffcv_dir, device=device, pin_memory=d.pin_memory)


def validation_accuracy(cfg: Config, model: torch.nn.Module, splits, device: torch.device) -> dict[str, float]:
    """Clean and robust (``train.val_attack``) accuracy on this process's share of the validation split."""
    attacks = {"robust": build_attack(cfg.train.val_attack, cfg.eps)}
    return evaluate(model, splits.val, attacks, device, cfg.eval.amp, channels_last=cfg.train.channels_last)


def validate_checkpoint(cfg: Config, checkpoint_file: Path, out: Path, device: torch.device, splits=None) -> dict:
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
    model = model_for(cfg, splits.spec).to(device, memory_format=_memory_format(cfg.train.channels_last))
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
        save_checkpoint(out / "best.safetensors", model, cfg.to_dict(), {"epoch": epoch, "val": val,
                                                                       **_ema_meta(cfg)})
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


def _ema_meta(cfg: Config) -> dict:
    """What a file of weights says of them under ``train.ema``: they are the average, of that decay."""
    return {"ema": cfg.train.ema} if cfg.train.ema else {}


def check_launcher(out: Path, launcher: str) -> None:
    """A run directory records how it was launched (``ray`` or ``in-process``); once it holds a
    checkpoint, a resume launched the other way is refused: Ray's restarts resume from the
    checkpoints Ray keeps, which an in-process run does not read, and the reverse, so the switch
    would silently train from scratch over the run."""
    path = out / "launch.json"
    recorded = json.loads(path.read_text())["launcher"] if path.exists() else launcher
    if recorded != launcher and (any(out.glob("*.safetensors")) or any(out.glob("checkpoint_*"))):
        how = {"ray": "through Ray (--workers N >= 1)", "in-process": "in-process (--workers 0)"}
        raise ConfigError(f"{out} was trained {how[recorded]}; resume it the same way, "
                          f"or give another --out to train {how[launcher].split(' (')[0]}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"launcher": launcher})


def read_summary(out: Path) -> dict | None:
    """A run directory's summary.json, or None while the run has not finished."""
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (none where there is no such file)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str | None:
    """Vendor, family, model and stepping: a cloud VM's model name ("AMD EPYC") hides the
    generation, and with it the speed of the seconds a summary records."""
    fields = _cpuinfo()
    if "vendor_id" not in fields:
        return None
    return f"{fields['vendor_id']} family {fields.get('cpu family')} model {fields.get('model')} " \
           f"stepping {fields.get('stepping')}"


def provenance(root: Path | None = None) -> dict:
    """What produced a run: the git commit of this checkout (and whether tracked files differ from
    it), or ATCD_RAY_COMMIT where there is no checkout (an image); the versions that matter."""
    root = root or Path(__file__).resolve().parent.parent
    commit, dirty = os.environ.get("ATCD_RAY_COMMIT"), None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout
    versions = {"python": platform.python_version()}
    for package in ("atcd_ray", "torch", "torchvision", "ray", "ffcv"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"commit": commit, "dirty": dirty, "versions": versions}


def hardware() -> dict:
    info = {"torch": torch.__version__, "cpu": cpu_name(), "cpu_id": cpu_id(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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


def _rank_file(rank: int) -> str:
    return "last.safetensors" if rank == 0 else f"rank{rank}.safetensors"


def _resume(directory: Path | None, cfg: Config, model, optimizer, method, group: Group,
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
    files = [ckpt.path] + [directory / _rank_file(r) for r in range(1, old_world)]
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


def _config_difference(old: dict, new: dict, prefix: str = "") -> str:
    """The first key whose value differs, as ' (KEY: OLD there, NEW here)', or ''."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _config_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f" ({prefix}{key}: {a!r} there, {b!r} here)"
    return ""


def _mean_over_ranks(group: Group, accuracy: dict[str, float], n: int) -> dict[str, float]:
    """Accuracies of the whole split from each rank's accuracy on its shard of n examples."""
    names = list(accuracy)
    totals = group.sum([accuracy[k] * n for k in names] + [float(n)])
    return {k: totals[i] / max(totals[-1], 1.0) for i, k in enumerate(names)}


def fit(cfg: Config, out_dir: str | Path, progress: bool = True, device: torch.device | None = None,
        group: Group | None = None, publish: Callable[[], None] | None = None) -> dict:
    """Train and test; returns summary.json's contents. ``publish``: called on rank 0 whenever the
    run directory's files have changed (a storage.RunUpload copies them to object storage)."""
    group = group or Group()
    code = provenance()  # now, not at the end: the checkout may move while the run trains
    rank, lead = group.rank, group.rank == 0
    publish = publish if lead and publish is not None else lambda: None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or default_device()
    seed_everything(cfg.seed, device)  # same initial weights on every rank
    d, t, o = cfg.data, cfg.train, cfg.optim
    splits = build_splits_of(cfg, device)
    # Fast-FGSM's end-of-epoch check: the same first training batch on every rank.
    splits.train.set_epoch(0)
    first_batch = tuple(tensor.to(device) for tensor in next(iter(splits.train)))
    splits.shard(rank, group.world_size)
    rank_weight = splits.train.local_batch_size * group.world_size / d.batch_size  # Method.rank_weight
    model = model_for(cfg, splits.spec).to(device, memory_format=_memory_format(t.channels_last))
    # The weight average (train.ema) copies the bare module, before compile and before a method
    # hooks into it; under DDP every rank averages its own, rank 0's is checkpointed.
    ema = EMA(model, t.ema) if t.ema else None
    optimizer = build_optimizer(cfg, model)
    if ema is not None:
        ema.follow(optimizer, model)  # after every optimiser step, however many a method takes
    if t.compile:
        model.compile()  # in place: the module, its state_dict keys and the optimizer's parameters stay
    method = METHODS[t.method](group.wrap(model, rank_weight), optimizer, cfg.eps, cfg.method_options)
    method.rank_weight = rank_weight
    if rank:
        torch.manual_seed(cfg.seed + 7919 * rank)  # own random starts and chains per rank

    best_path = out / "best.safetensors"
    if lead:
        for orphan in out.glob(".*.tmp"):  # a write a kill interrupted; the file it was for is whole
            if not orphan.name.startswith(VALIDATION_WRITES):  # a validation task may be writing these now
                orphan.unlink()
    meta = _resume(group.restore_dir(out), cfg, model, optimizer, method, group, ema)
    if lead and not meta:  # from scratch: validations found here are of other weights (a directory reused)
        (out / VALIDATIONS).unlink(missing_ok=True)
    check_not_diverged(out)
    start_epoch = meta.get("epoch", 0)
    train_seconds, best_val = meta.get("train_seconds", 0.0), meta.get("best_val", -1.0)
    history = meta.get("history", [])  # the epochs up to the checkpoint; later ones are redone
    # The code of every stretch of this run (a resume may run other code): summary.json says so.
    segments = meta.get("provenance", [])
    if not segments or segments[-1] != code:
        segments = [*segments, code]
    board = None
    if lead:
        write_history(out, history)
        board = TensorBoard(out / "tb", cfg, start_epoch)

    total_epochs = cfg.epochs_to_train  # fractional where a budget ends part-way through the last epoch

    def set_lr(epoch: float) -> float:
        lr = learning_rate(o.schedule, o.lr, epoch, total_epochs, o.milestones, o.gamma, o.warmup_fraction)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        return lr

    passes = cfg.passes_per_minibatch
    stopped_early = meta.get("stopped_early", False)
    done = EpochProgress(**meta["epoch_progress"]) if "epoch_progress" in meta else None  # a mid-epoch checkpoint
    if done is not None:  # this rank's images so far (every training batch is whole), on any number of ranks
        done.images = done.steps * splits.train.local_batch_size
    notices = meta.get("preemption_notices", 0)  # checkpoints written on a preemption notice, over the run

    def save_state(epochs_done: int, progress: EpochProgress | None = None) -> Path:
        """Rank 0 writes the group's checkpoint (weights, optimiser, and the meta that commits the
        history), every rank its own method state and RNG; ``progress``: how far the next epoch
        got, for a checkpoint inside it. Returns this rank's file."""
        own = out / _rank_file(rank)
        if lead:
            meta = {"epoch": epochs_done, "world_size": group.world_size, "train_seconds": train_seconds,
                    "best_val": best_val, "preemption_notices": notices,
                    "stopped_early": stopped_early, "history": history, "provenance": segments,
                    **({"epoch_progress": dataclasses.asdict(progress)} if progress else {})}
            save_checkpoint(own, model, cfg.to_dict(), meta, optimizer, method.state_dict(), torch.get_rng_state(),
                            keep_previous=True, ema=ema)
        else:
            save_checkpoint(own, None, {}, {"epoch": epochs_done}, None, method.state_dict(), torch.get_rng_state())
        return own

    def checkpoint_inside(epoch: int, progress: EpochProgress) -> None:
        progress.stretches = stretches
        record = {"epoch": epoch, "step_in_epoch": progress.steps, "train_seconds": train_seconds + progress.seconds}
        group.report(record, save_state(epoch, progress))
        publish()

    def checkpoint_now(steps: int) -> bool:
        nonlocal notices
        if steps % t.preemption_check_steps or not group.preempted():
            return False
        notices += 1
        return True

    for epoch in range(start_epoch, 0 if stopped_early else t.epochs):
        # Which steps of this epoch ran on how many workers: [first step, workers] per stretch.
        stretches = list(done.stretches) if done else []
        if not stretches or stretches[-1][1] != group.world_size:
            stretches.append([done.steps if done else 0, group.world_size])
        try:
            partial = epoch + 1 > total_epochs + 1e-9  # the budget's last, part-way epoch: its first steps
            steps = max(1, round((total_epochs - epoch) * len(splits.train))) if partial else None
            stats = train_epoch(method, splits.train, epoch, total_epochs, set_lr, device, amp=t.amp,
                                progress=progress and lead, channels_last=t.channels_last, pin_memory=d.pin_memory,
                                world_size=group.world_size, progress_interval=t.progress_seconds,
                                done=done, checkpoint_steps=t.checkpoint_steps,
                                checkpoint=lambda progress: checkpoint_inside(epoch, progress),
                                checkpoint_now=checkpoint_now, steps=steps)
            done = None
            check_finite_weights(model, epoch)
        except NonFiniteError as err:  # no checkpoint of this epoch: the last good one stays
            if lead:
                write_json_atomic(out / "diverged.json", {"error": str(err)})
                publish()
            raise
        stats["images_per_second"] = group.sum([stats["images_per_second"]])[0]
        train_seconds += stats["epoch_seconds"]
        with torch.random.fork_rng(devices=[]):  # same decision on every rank, same training stream
            torch.manual_seed(cfg.seed + epoch)
            stopped_early = method.end_epoch(first_batch)
        if stopped_early and ema is not None:
            # The method rolled the weights back to the last epoch's end (Fast-FGSM's collapse); the
            # average of the collapsed epoch would carry the collapse: it restarts from those weights.
            ema.module.load_state_dict(model.state_dict())
            log.warning("early stop: the weight average restarts from the rolled-back weights")
        record = {"epoch": epoch + 1, "budget_spent": min(epoch + 1, total_epochs) * passes,
                  **{f"train_{k}": v for k, v in stats.items()},
                  "train_stretches": stretches, "train_seconds": train_seconds, "finished_at": time.time()}
        improved = False
        validates = (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs or stopped_early
        if validates and not group.validates_async:  # else a task validates the checkpoint reported below
            started = time.perf_counter()
            val = _mean_over_ranks(group, validation_accuracy(cfg, model, splits, device), splits.val.num_examples)
            if ema is not None:  # the raw weights from the training stream, as without ema; the average apart
                record.update(val_clean_acc_raw=val["clean"], val_robust_acc_raw=val["robust"])
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(validation_seed(cfg, epoch + 1))
                    val = _mean_over_ranks(group, validation_accuracy(cfg, ema.module, splits, device),
                                           splits.val.num_examples)
            record.update(val_clean_acc=val["clean"], val_robust_acc=val["robust"],
                          val_seconds=time.perf_counter() - started)
            improved = t.select_best == "robust_val" and val["robust"] > best_val
            if improved:
                best_val = val["robust"]
        history.append(record)
        if lead and improved:
            save_checkpoint(best_path, model if ema is None else ema.module, cfg.to_dict(),
                            {"epoch": epoch + 1, "val": val, **_ema_meta(cfg)})
        own = save_state(epoch + 1)  # the epoch's record is committed with it
        if lead:
            write_history(out, history)
            board.epoch(record)
            publish()
        group.report(record, own, validate=group.validates_async and validates)
        if lead:
            log.info("epoch %d/%d  %s", epoch + 1, t.epochs, "  ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k in (
                    "train_loss", "train_mh_accept_rate", "val_clean_acc", "val_robust_acc", "val_robust_acc_raw",
                    "train_images_per_second")))
        if stopped_early:
            log.info("early stop after epoch %d (PGD accuracy on a training batch collapsed)", epoch + 1)
            break

    if group.validates_async:  # the best checkpoint and the records need every validation
        group.wait_for_validations()
        if lead:  # the other ranks test rank 0's choice (share_weights) and write nothing
            history = with_validations(out, history)
            missing = [r["epoch"] for r in history if "val_robust_acc" not in r and (
                r["epoch"] % t.val_every == 0 or r is history[-1])]
            if missing:  # a failed validation task (Ray logged why): the choice is among the others
                log.warning("epochs %s have no validation; best.safetensors is chosen among the others", missing)
            write_history(out, history)
    final = out / "last.safetensors"
    if ema is not None:  # the average's weights, for the test here and any evaluation later
        final = out / "ema.safetensors"
        if lead:
            save_checkpoint(final, ema.module, cfg.to_dict(), {"epoch": len(history), **_ema_meta(cfg),
                                                               "n_averaged": int(ema.n_averaged)})
            publish()
    chosen = best_path if t.select_best == "robust_val" and best_path.exists() else final
    if lead:
        model.load_state_dict(Checkpoint(chosen).model_state())
    group.share_weights(model)  # every rank tests rank 0's choice, without reading rank 0's files
    start = time.perf_counter()
    attacks = {name: build_attack(name, cfg.eps) for name in cfg.eval.attacks}
    test = _mean_over_ranks(group, evaluate(model, splits.test, attacks, device, cfg.eval.amp, progress and lead,
                                            t.channels_last), splits.test.num_examples)
    summary = {
        "dataset": cfg.dataset, "method": t.method, "model": cfg.model, "eps": cfg.eps, "seed": cfg.seed,
        "config": cfg.to_dict(), "clean_acc": test["clean"],
        "robust_acc": {name: test[name] for name in attacks},
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
        "epochs": len(history), "stopped_early": stopped_early, "checkpoint": chosen.name, "ema": t.ema,
        "eval_n": int(group.sum([float(splits.test.num_examples)])[0]), "workers": group.world_size,
        "preemption_notices": notices,
        "final_epoch": history[-1] if history else {},
        # Compute in natural-epoch equivalents: passes over the training set, epochs actually run.
        "passes_per_minibatch": passes, "budget": min(len(history), total_epochs) * passes,
        "train_examples": splits.train.size,
        "hardware": hardware(), "provenance": {**segments[-1], "earlier": segments[:-1]} if len(segments) > 1
        else segments[-1],
    }
    if lead:
        board.close(summary)
        write_json_atomic(out / "summary.json", summary)
        publish()
    return summary


class TensorBoard:
    """Rank 0's TensorBoard events under DIR/tb/, one step per epoch. A resumed run purges the
    steps after its checkpoint, so no step is written twice."""

    SCALARS = {"train_loss": "train/loss", "train_lr": "train/lr", "train_mh_accept_rate": "train/mh_accept_rate",
               "train_images_per_second": "train/images_per_second", "train_epoch_seconds": "train/epoch_seconds",
               "train_data_wait_fraction": "train/data_wait_fraction", "train_train_acc": "train/acc",
               "val_clean_acc": "val/clean_acc", "val_robust_acc": "val/robust_acc",
               # train.ema: val/* are the weight average's, val/*_raw the raw weights'
               "val_clean_acc_raw": "val/clean_acc_raw", "val_robust_acc_raw": "val/robust_acc_raw"}

    def __init__(self, log_dir: Path, cfg: Config, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.writer = SummaryWriter(str(log_dir), purge_step=start_epoch + 1 if start_epoch else None)
        if not start_epoch:
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)

    def epoch(self, record: dict) -> None:
        for key, tag in self.SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def close(self, summary: dict) -> None:
        hparams = {"method": self.cfg.train.method, "eps": self.cfg.eps, "epochs": self.cfg.train.epochs,
                   "lr": self.cfg.optim.lr, "batch_size": self.cfg.data.batch_size, "seed": self.cfg.seed}
        if self.cfg.train.ema:
            hparams["ema"] = self.cfg.train.ema
        options = self.cfg.method_options
        hparams.update({f"{self.cfg.train.method}.{k}": v for k, v in vars(options).items()
                        if isinstance(v, (int, float, str, bool))})
        metrics = {"test/clean_acc": summary["clean_acc"],
                   **{f"test/{name}": acc for name, acc in summary["robust_acc"].items()}}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()
