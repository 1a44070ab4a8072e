"""Checkpoints on object storage: ``load_model`` and ``python -m atcd_ray.evaluate`` read them from
an s3:// URI, here a real S3 server (SeaweedFS) on 127.0.0.1; bad URIs are one clear error."""
import json
import os
import subprocess
import sys

import pyarrow.fs
import pytest
import torch

import atcd_ray
from atcd_ray import evaluate
from atcd_ray.cli import run_main
from atcd_ray.config import load_config
from atcd_ray.core.checkpoint import CheckpointError, save_checkpoint
from atcd_ray.core.models import build_model


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def upload(local, uri):
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=filesystem)


def test_load_model_and_evaluate_read_a_checkpoint_from_s3(s3_env, trained_digits_model, tmp_path, capsys,
                                                           shared_ray):
    local = save_checkpoint(tmp_path / "model.safetensors", trained_digits_model,
                            config=load_config("digits").to_dict())
    uri = "s3://runs/models/digits/model.safetensors"
    upload(local, uri)

    remote = atcd_ray.load_model(uri)
    for (name, a), (_, b) in zip(atcd_ray.load_model(local).state_dict().items(), remote.state_dict().items()):
        assert torch.equal(a, b), name
    assert not remote.training

    # eps 0.05: about half the images hold (at the recipe's 0.1, 3 of these 32), so 0 < PGD-10 has room
    args = ["--attacks", "pgd10", "--eval-n", "32", "--batch-size", "16", "--eps", "0.05"]
    assert run_main(evaluate.main, [str(local), *args, "--json", str(tmp_path / "local.json")]) == 0
    assert run_main(evaluate.main, [uri, *args, "--json", str(tmp_path / "remote.json")]) == 0
    here, there = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert there["checkpoint"] == uri and there["correct"] == here["correct"]
    assert 0 < there["robust_acc"]["pgd10"] < there["clean_acc"]

    # Two Ray actors, each copying the object for itself: on the shared Ray, whose processes have no
    # AWS environment, so the driver's must go with them (their runtime environment)
    from tests.test_distributed import _env

    sharded = tmp_path / "actors.json"
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.evaluate", uri, *args, "--workers", "2", "--json",
                           str(sharded)], env={**_env(shared_ray), **s3_env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(sharded.read_text())["correct"] == here["correct"]

    # The object replaced by another model: its stored batches are not reused
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model("compactcnn", 10, 1),
                            config=load_config("digits").to_dict())
    upload(other, uri)
    assert run_main(evaluate.main, [uri, *args, "--json", str(tmp_path / "remote.json")]) == 2
    assert "(its checkpoint_sha256 differ)" in capsys.readouterr().err


def test_a_missing_or_malformed_uri_is_one_clear_error(s3_env, capsys, tmp_path):
    assert run_main(evaluate.main, ["s3://runs/models/none.safetensors"]) == 2
    assert "s3://runs/models/none.safetensors: no such file" in capsys.readouterr().err
    assert run_main(evaluate.main, ["s3://runs/models/x.safetensors?bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://runs/models/x.safetensors?bogus=1: cannot be read") and err.count("\n") == 1
    torn = tmp_path / "torn.safetensors"  # an object that is no checkpoint: the error names it, not a local copy
    torn.write_bytes(b"\x10not a checkpoint")
    upload(torn, "s3://runs/models/torn.safetensors")
    assert run_main(evaluate.main, ["s3://runs/models/torn.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://runs/models/torn.safetensors is not a readable safetensors checkpoint"), err
    with pytest.raises(CheckpointError, match="^s3://runs/models/torn.safetensors is not a readable"):
        atcd_ray.load_model("s3://runs/models/torn.safetensors")


def _objects(uri):
    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {info.path[len(root) + 1:] for info in found if info.type == pyarrow.fs.FileType.File}


def _read(uri):
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read().decode()


@pytest.mark.timeout(900)
def test_a_run_on_s3_survives_a_worker_kill_resumes_and_reports(s3_env, tmp_path):
    """--out s3://...: Ray's checkpoints and the run's files (checkpoints, metrics, summary,
    TensorBoard) go to the bucket; a killed worker's group restarts from Ray's checkpoint there;
    the report reads the run from the bucket and puts its files beside it."""
    import signal
    import time

    import psutil

    uri = "s3://runs/train/digits-pgd"
    env = {**os.environ, **s3_env}
    cmd = [sys.executable, "-m", "atcd_ray.train", "digits", "--method", "pgd", "--workers", "1", "--epochs", "3",
           "--eval-n", "100", "--seed", "1", "--out", uri, "--set", "eval.attacks=[pgd10]", "--set", "train.val_n=64",
           "--set", "data.batch_size=32", "--set", "train.select_best=robust_val", "--set", "methods.pgd.steps=3",
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 600
        while not ({"checkpoint_manager_snapshot.json", "metrics.jsonl"} <= _objects(uri)):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first epoch"
            time.sleep(1)
        (worker,) = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)  # this run's, no other's
                     if "ray::RayTrainWorker" in " ".join(p.cmdline())]
        os.kill(worker, signal.SIGKILL)
        log, _ = proc.communicate(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert "resuming from" in log, "the restarted group resumes from Ray's checkpoint in the bucket"
    assert not list(tmp_path.iterdir()), "nothing of the run is left on the local disk"
    objects = _objects(uri)
    assert {"summary.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "launch.json"} <= objects
    assert any(o.startswith("tb/events.out.tfevents") for o in objects)
    assert any(o.startswith("checkpoint_") for o in objects)  # Ray's own, in its storage path
    summary = json.loads(_read(f"{uri}/summary.json"))
    assert summary["epochs"] == 3 and summary["checkpoint"] == "best.safetensors"
    assert [json.loads(line)["epoch"] for line in _read(f"{uri}/metrics.jsonl").splitlines()] == [1, 2, 3]

    report = subprocess.run([sys.executable, "-m", "atcd_ray.report", uri, "--eval-n", "20", "--steps", "1,5",
                             "--eps-scales", "1"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert {"report/report.md", "report/curves.png"} <= _objects(uri)
    assert "pgd on digits" in _read(f"{uri}/report/report.md")


@pytest.mark.timeout(600)
def test_an_in_process_run_on_s3_resumes_from_the_bucket(s3_env, tmp_path):
    uri = "s3://runs/train/digits-natural"
    env = {**os.environ, **s3_env}
    cmd = [sys.executable, "-m", "atcd_ray.train", "digits", "--method", "natural", "--workers", "0", "--eval-n", "50",
           "--out", uri, "--set", "eval.attacks=[pgd10]", "--set", "train.val_n=32", "--quiet"]
    first = subprocess.run([*cmd, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"summary: {uri}/summary.json" in first.stdout
    assert {"summary.json", "metrics.jsonl", "last.safetensors", "launch.json"} <= _objects(uri)
    # The same run again: resumed from the bucket's checkpoint, nothing trained twice.
    again = subprocess.run([*cmd, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "resuming from" in again.stderr and "after epoch 1" in again.stderr, again.stderr
    assert [json.loads(line)["epoch"] for line in _read(f"{uri}/metrics.jsonl").splitlines()] == [1]
    # Its config is checked against the bucket's checkpoint, like a local run's
    other = subprocess.run([*cmd, "--epochs", "1", "--seed", "5"], env=env, capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert other.returncode == 2 and "seed: 0 there, 5 here" in other.stderr, other.stderr
    assert not list(tmp_path.iterdir())
