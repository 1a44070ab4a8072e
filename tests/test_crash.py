"""Crash consistency: a run SIGKILLed at random instants, during steps and during a checkpoint
write, and rerun each time until it finishes, ends bit for bit where an uninterrupted run ends;
a torn metrics line and a truncated checkpoint resume with one warning line each."""
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from atcd_ray import run_dir, trainer
from atcd_ray.core.checkpoint import Checkpoint, previous_path
from tests.test_checkpoint import crash_in_epoch_3, quick_config

EPOCHS = 3
ARGS = ["digits", "--workers", "0", "--method", "atcd", "--epochs", str(EPOCHS), "--subset", "768", "--eval-n", "64",
        "--set", "train.val_n=64", "--set", "train.val_attack=pgd3", "--set", "eval.attacks=[pgd5]",
        "--set", "train.progress_seconds=0.01"]
# The training command, with checkpoint writes slowed down after the temporary file is whole and
# before it is renamed, so that a kill can land inside the write (the window is otherwise ~1 ms).
CHILD = """
import sys, time
import atcd_ray.core.checkpoint as checkpoint
real = checkpoint.save_file
def slow_save(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(0.5)
checkpoint.save_file = slow_save
from atcd_ray.cli import run_main
from atcd_ray.train import main
sys.exit(run_main(main, sys.argv[1:]))
"""
TIMING = ("seconds", "per_second", "wait_fraction", "started_at", "finished_at")  # wall-clock fields differ between any two runs


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *ARGS, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)


def run_and_kill(out: Path, when) -> bool:
    """Run the command; SIGKILL it the first time ``when(progress_line)`` holds or a checkpoint's
    temporary file exists while ``when("checkpoint")`` holds. True if it was killed."""
    proc = start(out)
    killed = threading.Event()

    def watch_files():
        while proc.poll() is None and not killed.is_set():
            if any(out.glob(".last.safetensors.*.tmp")) and when("checkpoint"):
                proc.send_signal(signal.SIGKILL)
                killed.set()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_files, daemon=True)
    watcher.start()
    for line in proc.stderr:
        if not killed.is_set() and when(line):
            proc.send_signal(signal.SIGKILL)
            killed.set()
    proc.wait()
    watcher.join()
    assert proc.returncode == (-signal.SIGKILL if killed.is_set() else 0), proc.returncode
    return killed.is_set()


def step_of(line: str) -> tuple[int, int] | None:
    match = re.search(r"epoch (\d+)/\d+  step (\d+)/", line)
    return (int(match[1]), int(match[2])) if match else None


def final_state(out: Path):
    metrics = [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return Checkpoint(out / "last.safetensors"), metrics, (summary["clean_acc"], summary["robust_acc"])


@pytest.mark.timeout(900)
def test_random_kills_leave_the_final_state_of_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    assert not run_and_kill(straight, lambda line: False)

    rng = random.Random(0)
    crashed, kills = tmp_path / "crashed", []
    # A kill inside the first epoch (no checkpoint yet), one inside the checkpoint write after
    # epoch 1, one at a random step of a later epoch, then a random instant of the next run.
    first_step, later = rng.randint(2, 10), (rng.randint(2, EPOCHS), rng.randint(1, 11))
    plans = {
        "epoch 1 step": lambda line: step_of(line) is not None and step_of(line) >= (1, first_step),
        "checkpoint write": lambda line: line == "checkpoint",
        "later step": lambda line: step_of(line) is not None and step_of(line) >= later,
    }
    for name, plan in plans.items():
        if run_and_kill(crashed, plan):
            kills.append(name)
    deadline = time.monotonic() + rng.uniform(3.0, 12.0)
    if run_and_kill(crashed, lambda line: time.monotonic() > deadline):
        kills.append("instant")
    while run_and_kill(crashed, lambda line: False):
        pass
    assert len(kills) >= 3 and "checkpoint write" in kills, kills
    assert not list(crashed.glob(".*.tmp")), "a killed write's temporary file is cleaned up by the next run"

    (a, metrics_a, test_a), (b, metrics_b, test_b) = final_state(straight), final_state(crashed)
    assert a.meta["epoch"] == b.meta["epoch"] == EPOCHS
    for key, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[key]), key  # weights, optimiser, chain, RNG
    assert metrics_a == metrics_b and [m["epoch"] for m in metrics_b] == list(range(1, EPOCHS + 1))
    assert test_a == test_b


def test_truncated_checkpoint_and_torn_metrics_line_resume_with_one_warning(tmp_path, monkeypatch, caplog):
    cfg = quick_config()
    trainer.fit(cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "crashed"
    crash_in_epoch_3(cfg, out, monkeypatch)
    last, metrics = out / "last.safetensors", out / "metrics.jsonl"
    assert Checkpoint(last).meta["epoch"] == 2 and Checkpoint(previous_path(last)).meta["epoch"] == 1
    # What a crash on a disk without ordered writes, or a copy cut short, can leave.
    last.write_bytes(last.read_bytes()[:4096])
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo')

    with caplog.at_level("WARNING", logger="atcd_ray"):
        assert [h["epoch"] for h in run_dir.read_history(out)] == [1, 2]
    assert [r.getMessage() for r in caplog.records] == [f"{metrics}: last line is torn (22 characters); ignored"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="atcd_ray"):
        trainer.fit(cfg, out, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1 and warnings[0].startswith(f"{last} is unreadable") and \
        warnings[0].endswith("resuming from last.previous.safetensors"), warnings
    assert (out / "last.safetensors.corrupt").exists()  # set aside, not rotated over the good one
    a = Checkpoint(tmp_path / "straight" / "last.safetensors")
    b = Checkpoint(last)
    for key, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[key]), key
    assert [h["epoch"] for h in run_dir.read_history(out)] == [1, 2, 3]


def test_a_middle_line_that_is_not_json_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2: not a JSON record"):
        run_dir.read_history(tmp_path)


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    from atcd_ray.core.engine import NonFiniteError

    cfg = quick_config()
    real = trainer.train_epoch

    def poison_epoch_2(method, batches, **kwargs):
        stats = real(method, batches, **kwargs)
        if kwargs["epoch"] == 1:
            with torch.no_grad():
                next(method.model.parameters())[0].fill_(float("inf"))
        return stats

    monkeypatch.setattr(trainer, "train_epoch", poison_epoch_2)
    with pytest.raises(NonFiniteError, match=r"non-finite values in [\w.]+ after epoch 2"):
        trainer.fit(cfg, tmp_path, progress=False)
    assert Checkpoint(tmp_path / "last.safetensors").meta["epoch"] == 1
    assert [h["epoch"] for h in run_dir.read_history(tmp_path)] == [1]
    monkeypatch.setattr(trainer, "train_epoch", real)
    with pytest.raises(NonFiniteError, match="stopped on a non-finite"):  # at once, not after another epoch
        trainer.fit(cfg, tmp_path, progress=False)


def test_a_diverging_learning_rate_exits_3_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.train", *ARGS, "--set", "optim.lr=1e6", "--quiet",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite training loss (nan) at epoch 1, step ")


def test_a_run_directory_refuses_to_be_resumed_by_another_launcher(tmp_path):
    def train(workers):
        return subprocess.run([sys.executable, "-m", "atcd_ray.train", ARGS[0], "--workers", str(workers), *ARGS[3:],
                               "--epochs", "1", "--quiet", "--out", str(tmp_path)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)

    assert train(0).returncode == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    switched = train(1)  # refused before Ray starts: Ray would not see the in-process checkpoint
    assert switched.returncode == 2 and "Traceback" not in switched.stderr
    assert switched.stderr.strip() == (f"error: {tmp_path} was trained in-process (--workers 0); resume it the same "
                                       "way, or give another --out to train through Ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_run_from_scratch_ignores_validations_left_in_its_directory(tmp_path):
    """A directory reused without its checkpoints (deleted by hand, or another run's) may hold
    validation.jsonl: a run starting from scratch removes it, or its figures would be merged into
    the new epochs' records as if they were theirs."""
    cfg = quick_config()
    straight = trainer.fit(cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "reused"
    out.mkdir()
    stale = {"epoch": 1, "val_clean_acc": 0.123, "val_robust_acc": 0.0456}
    (out / run_dir.VALIDATIONS).write_text(json.dumps(stale) + "\n")
    reused = trainer.fit(cfg, out, progress=False)
    first, expected = run_dir.read_history(out)[0], run_dir.read_history(tmp_path / "straight")[0]
    assert (first["val_clean_acc"], first["val_robust_acc"]) == (
        expected["val_clean_acc"], expected["val_robust_acc"]) != (0.123, 0.0456)
    assert not (out / run_dir.VALIDATIONS).exists() and reused["clean_acc"] == straight["clean_acc"]
