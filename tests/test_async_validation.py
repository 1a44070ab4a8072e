"""Robust validation off the training workers (train.val_async): a Ray task validates each
epoch's checkpoint while the workers train the next epoch; the best checkpoint is the best by the
validated metric; a Tune trial gets every epoch's record once it is validated (ASHA's input)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from atcd_ray.config import ConfigError, load_config
from atcd_ray.core.checkpoint import Checkpoint
from atcd_ray.sweep import Sizing

from .test_distributed import _env
from .test_tune import _space

RUN = [("train.method", "pgd"), ("methods.pgd.steps", 3), ("train.epochs", 3), ("data.batch_size", 64),
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
    # The plant only notes the placement group epoch 1's validation runs in (released at once).
    (tmp_path / "released").touch()
    env = _planted_env(tmp_path, PLANT="hold", PLANT_EPOCH="1", PLANT_HELD=str(tmp_path / "group"),
                       PLANT_RELEASE=str(tmp_path / "released"))
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.tune", str(space), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # In a placement group: the trial's own (its second bundle, which Tune frees with the trial)
    assert (tmp_path / "group").read_text() not in ("", "None")
    (trial,) = [p for p in (out / "runs").iterdir()]
    validated, history = _records(trial / "validation.jsonl"), _records(trial / "metrics.jsonl")
    assert [v["epoch"] for v in validated] == [h["epoch"] for h in history] == [1, 2, 3]
    for v, h in zip(validated, history):  # metrics.jsonl takes the validations in
        assert (h["val_clean_acc"], h["val_robust_acc"]) == (v["val_clean_acc"], v["val_robust_acc"])
    # Training went on while the validation of the epoch before ran: no wait between epochs as
    # long as the validation, and epoch e + 1's training started before epoch e's validation
    # ended. (Not that the validation starts before epoch e + 1 ends: on a loaded 2-core machine a
    # Ray task's start can lag an epoch of the digits, which CI once saw.)
    for wait, v, after in zip(_waits(history), validated, history[1:]):
        assert wait < v["val_seconds"], (wait, v)
        assert v["val_finished_at"] > after["finished_at"] - after["train_epoch_seconds"], (v, after)

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
    from atcd_ray.validation import validate_checkpoint

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


def test_a_validation_task_that_could_never_start_is_refused_before_training(tmp_path, shared_ray):
    """At the end the workers wait for the validations: with no room beside them, a validation
    would wait for the workers to leave, forever. One line, exit 2, before any training."""
    cpus = "2"  # the workers take every CPU of the (shared, 2-CPU) cluster
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.train", "digits", "--epochs", "1", "--out",
                           str(tmp_path / "run"), "--cpus-per-worker", cpus, "--set", "train.val_async=true"],
                          capture_output=True, text=True, env=_env(shared_ray), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"train.val_async: 1 worker(s) x {cpus} CPUs and a validation task of 1 CPUs, 0 GPUs need " in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoint_*"))


def test_ray_still_runs_one_validation_at_a_time():
    """validate_checkpoint's files have one writer at a time because Ray's controller keeps one
    validation in flight (a private constant of an alpha API: this fails if Ray changes it)."""
    from ray.train.v2._internal.execution.checkpoint.validation_manager import MAX_IN_FLIGHT_VALIDATIONS

    assert MAX_IN_FLIGHT_VALIDATIONS == 1


# Loaded by every Python process of a run (sitecustomize on PYTHONPATH), Ray's validation tasks
# included: once atcd_ray.validation is imported, the validation of epoch PLANT_EPOCH fails on every
# try (PLANT=fail), or waits until the file PLANT_RELEASE exists, having written its placement
# group's id to PLANT_HELD (hold).
PLANT = '''
import importlib.machinery, os, pathlib, sys, time

class PlantInValidation:
    def find_spec(self, name, path, target=None):
        if name != "atcd_ray.validation":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            validate = module.validate_checkpoint

            def planted(cfg, checkpoint_file, *args, **kwargs):
                if module.Checkpoint(checkpoint_file).meta["epoch"] == int(os.environ["PLANT_EPOCH"]):
                    if os.environ["PLANT"] == "fail":
                        raise RuntimeError("planted failure of this validation")
                    import ray  # which placement group the task runs in: the run's reservation
                    group = ray.get_runtime_context().get_placement_group_id()
                    held = pathlib.Path(os.environ["PLANT_HELD"])
                    held.with_suffix(".tmp").write_text(str(group))
                    held.with_suffix(".tmp").rename(held)  # whole when it appears
                    deadline = time.time() + 300
                    while not os.path.exists(os.environ["PLANT_RELEASE"]) and time.time() < deadline:
                        time.sleep(0.2)
                return validate(cfg, checkpoint_file, *args, **kwargs)

            module.validate_checkpoint = planted

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, PlantInValidation())
'''


def _planted_env(tmp_path: Path, **plant: str) -> dict:
    """The tests' environment for a run, with PLANT in every Python process it starts."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(PLANT)
    env = _env()
    env.update(PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{env['PYTHONPATH']}", **plant)
    return env


def _two_worker_run(tmp_path: Path, **plant: str) -> tuple[list[str], dict]:
    """The command and environment of a 2-worker (DDP) run of RUN with async validation and a plant."""
    env = _planted_env(tmp_path, **plant)
    # 2 workers of half a CPU and a task of one: what fits on a 2-core machine
    command = [sys.executable, "-m", "atcd_ray.train", "digits", "--workers", "2", "--cpus-per-worker", "0.5",
               "--quiet", "--out", str(tmp_path / "run"), "--set", "train.val_async=true",
               *[a for k, v in RUN for a in ("--set", f"{k}={json.dumps(v)}")]]
    return command, env


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)  # this run's processes only


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile: Ray's processes come and go
        return ""


@pytest.mark.timeout(900)
def test_two_workers_and_a_validation_that_fails_every_try(tmp_path):
    """Two workers (DDP) train on while epoch 2's validation task fails on each of Ray's retries:
    the run finishes, that epoch's record says nothing of validation, the others' say what their
    tasks measured, and the best checkpoint is chosen among the validated epochs."""
    command, env = _two_worker_run(tmp_path, PLANT="fail", PLANT_EPOCH="2")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=800)
    output, out = proc.stdout + proc.stderr, tmp_path / "run"
    assert proc.returncode == 0, output[-4000:]
    assert "planted failure of this validation" in output  # the plant fired (positive control)
    assert "epochs [2] have no validation; best.safetensors is chosen among the others" in output
    validated, history = _records(out / "validation.jsonl"), _records(out / "metrics.jsonl")
    assert [v["epoch"] for v in validated] == [1, 3] and [h["epoch"] for h in history] == [1, 2, 3]
    assert "val_robust_acc" not in history[1]
    for v, h in zip(validated, (history[0], history[2])):
        assert (h["val_clean_acc"], h["val_robust_acc"]) == (v["val_clean_acc"], v["val_robust_acc"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["checkpoint"] == "best.safetensors"
    best = max(validated, key=lambda v: v["val_robust_acc"])
    assert Checkpoint(out / "best.safetensors").meta["epoch"] == best["epoch"]


@pytest.mark.timeout(900)
def test_a_worker_killed_while_a_validation_is_pending(tmp_path):
    """A training worker is killed while epoch 1's validation is under way in its reserved
    placement group: Ray restarts the group from its latest checkpoint, and at the end every epoch is validated and recorded exactly once
    (validation.jsonl, metrics.jsonl, TensorBoard), the best checkpoint the best of them."""
    held, release = tmp_path / "held", tmp_path / "release"
    command, env = _two_worker_run(tmp_path, PLANT="hold", PLANT_EPOCH="1", PLANT_HELD=str(held),
                                   PLANT_RELEASE=str(release))
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 600
        while not held.exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        assert held.read_text() not in ("", "None")  # the task runs in the run's reserved placement group
        workers = sorted(p.pid for p in _children(proc.pid) if "ray::RayTrainWorker" in _cmdline(p))
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        while "resuming from" not in log.read_text():  # the new group has started from the checkpoint
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        release.touch()
        proc.wait(timeout=600)
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
    output, out = log.read_text(), tmp_path / "run"
    assert proc.returncode == 0, output[-4000:]
    validated, history = _records(out / "validation.jsonl"), _records(out / "metrics.jsonl")
    assert [v["epoch"] for v in validated] == [h["epoch"] for h in history] == [1, 2, 3]
    for v, h in zip(validated, history):
        assert (h["val_clean_acc"], h["val_robust_acc"]) == (v["val_clean_acc"], v["val_robust_acc"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb" / "validation")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/robust_acc")] == [
        (v["epoch"], pytest.approx(v["val_robust_acc"])) for v in validated]
    best = max(validated, key=lambda v: v["val_robust_acc"])
    assert Checkpoint(out / "best.safetensors").meta["epoch"] == best["epoch"]
    assert json.loads((out / "summary.json").read_text())["workers"] == 2


def test_validation_every_second_epoch_and_after_the_last_and_the_best_among_those(tmp_path):
    """train.val_every = 2 over 5 epochs: epochs 2, 4 and 5 validated (the last always), the others
    not; the best checkpoint is one of those. Control: val_every = 1 validates all five."""
    from atcd_ray.trainer import fit

    small = [("train.method", "fast"), ("data.subset", 256), ("data.batch_size", 64), ("train.val_n", 64),
             ("train.val_attack", "pgd3"), ("train.select_best", "robust_val"), ("eval.n", 32),
             ("eval.attacks", ["fgsm"]), ("train.epochs", 5)]
    for every, expected in ((2, [2, 4, 5]), (1, [1, 2, 3, 4, 5])):
        out = tmp_path / f"every{every}"
        fit(load_config("digits", overrides=[*small, ("train.val_every", every)]), out, progress=False)
        history = _records(out / "metrics.jsonl")
        assert [h["epoch"] for h in history if "val_robust_acc" in h] == expected
        best = max((h for h in history if "val_robust_acc" in h), key=lambda h: h["val_robust_acc"])
        assert Checkpoint(out / "best.safetensors").meta["epoch"] == best["epoch"]
