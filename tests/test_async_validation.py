"""Robust validation off the training workers (train.val_async): a Ray task validates each
epoch's checkpoint while the workers train the next epoch; the best checkpoint is the best by the
validated metric; a Tune trial gets every epoch's record once it is validated (ASHA's input)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atcd_ray.config import ConfigError, load_config
from atcd_ray.core.checkpoint import Checkpoint
from atcd_ray.tune import Sizing

from .test_distributed import _env
from .test_tune import _space

RUN = [("train.method", "pgd"), ("train.epochs", 3), ("data.batch_size", 64),
       ("train.val_n", 197), ("train.val_attack", "pgd20"), ("train.select_best", "robust_val"),
       ("eval.n", 100), ("eval.attacks", ["pgd10"])]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _waits(history: list[dict]) -> list[float]:
    """Seconds between the end of each epoch's training and the start of the next one's."""
    return [b["finished_at"] - b["train_epoch_seconds"] - a["finished_at"] for a, b in zip(history, history[1:])]


@pytest.mark.timeout(900)
def test_validation_runs_beside_training_and_tune_and_the_best_checkpoint_use_its_result(tmp_path):
    out = tmp_path / "sweep"
    space = _space(tmp_path, fixed={"train.val_async": True, **dict(RUN)}, scheduler={"name": "fifo"},
                   metric={"val_robust_acc": 1.0, "val_clean_acc": 0.5}, params={"optim.lr": {"grid": [0.05]}})
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.tune", str(space), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (trial,) = [p for p in (out / "runs").iterdir()]
    validated, history = _records(trial / "validation.jsonl"), _records(trial / "metrics.jsonl")
    assert [v["epoch"] for v in validated] == [h["epoch"] for h in history] == [1, 2, 3]
    for v, h in zip(validated, history):  # metrics.jsonl takes the validations in
        assert (h["val_clean_acc"], h["val_robust_acc"]) == (v["val_clean_acc"], v["val_robust_acc"])
    # Training went on while the validation of the epoch before ran: no wait between epochs as
    # long as the validation, and the validation of epoch e overlaps the training of epoch e + 1.
    for wait, v, after in zip(_waits(history), validated, history[1:]):
        assert wait < v["val_seconds"], (wait, v)
        assert v["val_started_at"] < after["finished_at"] and \
            v["val_finished_at"] > after["finished_at"] - after["train_epoch_seconds"], (v, after)

    # Tune got each epoch once validated: one result per epoch, with its validation and objective.
    tune_results = _records(out / trial.name / "result.json")
    assert [(r["training_iteration"], r["epoch"]) for r in tune_results] == [(1, 1), (2, 2), (3, 3)]
    for r, v in zip(tune_results, validated):
        assert r["val_robust_acc"] == v["val_robust_acc"]
        assert r["objective"] == pytest.approx(v["val_robust_acc"] + 0.5 * v["val_clean_acc"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trial / "tb" / "validation")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/robust_acc")] == [
        (v["epoch"], pytest.approx(v["val_robust_acc"])) for v in validated]

    # The best checkpoint is the epoch with the best validated robust accuracy, tested at the end,
    # and its weights give that accuracy again (the validation's draws are seeded by seed and epoch).
    best = max(validated, key=lambda v: v["val_robust_acc"])
    summary = json.loads((trial / "summary.json").read_text())
    ckpt = Checkpoint(trial / "best.safetensors")
    assert ckpt.meta["epoch"] == best["epoch"] and summary["checkpoint"] == "best.safetensors"
    assert summary["final_epoch"]["val_robust_acc"] == validated[-1]["val_robust_acc"]
    from atcd_ray.trainer import validate_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the validation task (one CPU): the same sums
    try:
        again = validate_checkpoint(load_config("digits", overrides=RUN), ckpt.path, tmp_path / "again",
                                    torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert (again["val_clean_acc"], again["val_robust_acc"]) == (best["val_clean_acc"], best["val_robust_acc"])


@pytest.mark.timeout(600)
def test_positive_control_workers_that_validate_wait_for_it(tmp_path):
    """The check above fires on today's synchronous validation (in-process): the workers wait for
    each validation before the next epoch."""
    from atcd_ray.trainer import fit

    fit(load_config("digits", overrides=RUN), tmp_path / "run", progress=False)
    history = _records(tmp_path / "run" / "metrics.jsonl")
    assert not (tmp_path / "run" / "validation.jsonl").exists()
    assert all(wait >= h["val_seconds"] for wait, h in zip(_waits(history), history)), history


def test_a_validation_task_is_counted_in_the_resources_a_trial_needs():
    assert Sizing([], workers=1, cpus_per_worker=1, validation=(1, 0)).concurrent_trials(cpus=4, gpus=0) == 2
    assert Sizing([], workers=1, gpu=True, cpus_per_worker=1, validation=(1, 0.5)).concurrent_trials(
        cpus=16, gpus=3) == 2
    with pytest.raises(ConfigError, match="and a validation task of 1 CPUs, 0 GPUs"):
        Sizing([], workers=2, cpus_per_worker=1, validation=(1, 0)).concurrent_trials(cpus=2, gpus=0)


def test_a_validation_task_that_could_never_start_is_refused_before_training(tmp_path):
    """At the end the workers wait for the validations: with no room beside them, a validation
    would wait for the workers to leave, forever. One line, exit 2, before any training."""
    cpus = str(os.cpu_count())  # the workers take every CPU of this machine
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.train", "digits", "--epochs", "1", "--out",
                           str(tmp_path / "run"), "--cpus-per-worker", cpus, "--set", "train.val_async=true"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"train.val_async: 1 worker(s) x {cpus} CPUs and a validation task of 1 CPUs, 0 GPUs need " in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoint_*"))


def test_ray_still_runs_one_validation_at_a_time():
    """validate_checkpoint's files have one writer at a time because Ray's controller keeps one
    validation in flight (a private constant of an alpha API: this fails if Ray changes it)."""
    from ray.train.v2._internal.execution.checkpoint.validation_manager import MAX_IN_FLIGHT_VALIDATIONS

    assert MAX_IN_FLIGHT_VALIDATIONS == 1
