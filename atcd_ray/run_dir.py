"""A run directory's files and the checks on them: metrics.jsonl (the epoch records), the
validations done apart from training, summary.json, launch.json, diverged.json, and whether a
checkpoint there may be resumed under a config. Every file is written whole or not at all
(``write_text_atomic``: temporary file, fsync, rename, directory fsync).

    DIR/last.safetensors         the latest checkpoint (last.previous.safetensors: the one before)
    DIR/rankR.safetensors        rank R's method state and RNG (R >= 1)
    DIR/best.safetensors         the best validated epoch's weights (select_best = robust_val)
    DIR/ema.safetensors          the weight average at the end (train.ema)
    DIR/metrics.jsonl            one record per epoch, validations merged in
    DIR/validation.jsonl         the validations done apart from training (train.val_async)
    DIR/summary.json             the final test, config, hardware and code: the run is done
    DIR/tb/                      TensorBoard events
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import Config, ConfigError
from .core.checkpoint import (CheckpointError, checkpoint_config, previous_path, write_json_atomic,
                              write_text_atomic)
from .core.engine import NonFiniteError

log = logging.getLogger("atcd_ray")


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


def rank_file(rank: int) -> str:
    """The checkpoint file of a rank: rank 0's holds the group's weights, the others their own method state."""
    return "last.safetensors" if rank == 0 else f"rank{rank}.safetensors"


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


def remove_torn_writes(out: Path) -> None:
    """Temporary files a kill left behind (the file each was for is whole), except a validation
    task's, which may be writing them now."""
    for orphan in out.glob(".*.tmp"):
        if not orphan.name.startswith(VALIDATION_WRITES):
            orphan.unlink()


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
# Keys added later, at the value that trains as before they existed (no weight average, a
# validation after every epoch): a checkpoint written before them matches.
UNSET_KEYS = {("ema", None), ("val_every", 1)}


def _without_operational(config: dict) -> dict:
    """What a resume must keep: all but OPERATIONAL_KEYS, and of the methods' options only the
    trained method's (another method's, a default changed by an upgrade say, trains nothing here)."""
    train = config.get("train", {})
    methods = config.get("methods", {})
    train = {k: v for k, v in train.items() if k not in OPERATIONAL_KEYS and (k, v) not in UNSET_KEYS}
    return {**config, "train": train,
            "methods": {k: v for k, v in methods.items() if k == train.get("method")}}


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
