"""Data parallelism: shards, DDP gradients in the methods (torch gloo), and Ray Train end to end:
two workers, a worker killed mid-run, and ``ray job submit`` against a local head node."""
import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atcd_ray.core.methods import METHODS
from atcd_ray.core.models import build_model
from atcd_ray.data import TensorBatches

ROOT = Path(__file__).resolve().parent.parent


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    images, labels = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100)
    single = TensorBatches(images, labels, 8, shuffle=True, drop_last=True, seed=1)
    single.set_epoch(3)
    reference = torch.cat([y for _, y in single])
    shards = []
    for rank in range(2):
        part = TensorBatches(images, labels, 8, shuffle=True, drop_last=True, seed=1)
        part.shard(rank, 2)
        part.set_epoch(3)
        batches = [y for _, y in part]
        assert all(len(y) == 4 for y in batches) and len(batches) == len(part) == 12
        shards.append(torch.cat(batches))
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    # Minibatch i of rank 0 and of rank 1 together are minibatch i of the single process.
    for i, batch in enumerate(reference.view(-1, 8)):
        assert set(batch.tolist()) == set(shards[0][4 * i:4 * i + 4].tolist()) | set(shards[1][4 * i:4 * i + 4].tolist())


def test_a_workers_threads_are_its_cpus_capped_by_the_projects_variable(monkeypatch):
    from atcd_ray.distributed import worker_threads

    monkeypatch.delenv("ATCD_RAY_WORKER_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's cluster launcher exports it: not a cap
    assert worker_threads(2) == 2
    for value, threads in (("1", 1), ("4", 2), ("0", 2), ("", 2), ("two", 2), ("²", 2)):
        monkeypatch.setenv("ATCD_RAY_WORKER_THREADS", value)
        assert worker_threads(2) == threads, value


def _model():
    """SmallCNN with its dropout off, so that ranks differ only by their data and random starts."""
    model = build_model("smallcnn", 10, 1, mean=None, std=None)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, store_dir: str):
    """A gloo process group for ``mp.spawn`` workers, on a file store in ``store_dir``.

    A file store, not the TCP store of MASTER_ADDR: rank 0 then hosts no store server, which CI
    once saw abort at teardown ("terminate called without an active exception", SIGABRT in rank 0
    after both ranks had saved their results). The barrier lets no rank tear down while another
    is still in a collective. A rank whose body raises leaves without either (mp.spawn reports its
    error and ends the others); a stuck collective fails after 2 minutes, inside pytest's limit."""
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/gloo-store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    yield
    dist.barrier()
    dist.destroy_process_group()


def _ddp_worker(rank, method_name, result_dir):
    with gloo_group(rank, 2, result_dir):
        torch.manual_seed(0)
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        method = METHODS[method_name](ddp, torch.optim.SGD(model.parameters(), lr=0.5), 0.1,
                                      METHODS[method_name].Options())
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        torch.manual_seed(10 + rank)  # different random starts per rank, as in training
        for _ in range(2):
            method.step(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(result_dir) / f"{rank}.pt")
        del method, ddp  # DDP's reducer holds the group: release it before the group is destroyed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method_name", ["natural", "atcd", "yopo", "trades"])
def test_ddp_keeps_ranks_identical_and_natural_equals_the_full_batch(method_name, tmp_path):
    mp.spawn(_ddp_worker, args=(method_name, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for key in rank0:  # gradients were all-reduced: the two ranks took the same optimiser steps
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=1e-6)
    if method_name == "natural":  # the mean of the two half-batch gradients is the full-batch gradient
        torch.manual_seed(0)
        model = _model()
        method = METHODS["natural"](model, torch.optim.SGD(model.parameters(), lr=0.5), 0.1, None)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        for _ in range(2):
            method.step(x, y)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)


def _env(ray: dict | None = None) -> dict:
    """A subprocess's environment: this checkout and venv first; its own Ray, or the one whose
    variables ``ray`` holds (the ``shared_ray`` fixture's)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    return {**env, **(ray or {})}


def _epochs_logged(text):
    return [int(part.split("/")[0]) for part in text.split("epoch ")[1:] if part[:1].isdigit() and "/" in part[:6]]


@pytest.mark.timeout(900)
def test_a_killed_worker_is_replaced_and_the_run_finishes(tmp_path, shared_ray):
    out = tmp_path / "run"
    started = time.time()
    cmd = [sys.executable, "-m", "atcd_ray.train", "digits", "--method", "pgd", "--workers", "2", "--epochs", "5",
           "--eval-n", "100", "--seed", "1", "--out", str(out), "--set", "eval.attacks=[pgd10]",
           "--set", "train.val_n=64", "--set", "data.batch_size=32", "--set", "methods.pgd.steps=3", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(shared_ray),
                            cwd=tmp_path)
    try:
        # Kill once Ray has registered the first epoch's checkpoint (its snapshot file is written then).
        registered = out / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 600
        while not (registered.exists() and list(out.glob("checkpoint_*/rank1.safetensors"))):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first epoch"
            time.sleep(0.5)
        workers = sorted(p.pid for p in shared_ray.processes("ray::RayTrainWorker", since=started))
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        log, _ = proc.communicate(timeout=800)
        (tmp_path / "driver.log").write_text(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 5 and summary["workers"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    epochs = _epochs_logged(log)
    assert sorted(set(epochs)) == [1, 2, 3, 4, 5]
    assert len(epochs) - len(set(epochs)) <= 1, epochs  # at most the epoch in flight is repeated
    resumed = re.search(r"resuming from \S+ after epoch (\d)", log)
    assert resumed and int(resumed[1]) >= 1, "the replaced group resumes from a checkpoint, not from scratch"
    # The same training uninterrupted, in this process (DDP's two half-batches are one batch
    # here; PGD's random starts differ): the final test accuracies agree within noise (100 images).
    from atcd_ray import trainer
    from atcd_ray.config import load_config

    cfg = load_config("digits", overrides=[("train.method", "pgd"), ("train.epochs", 5), ("eval.n", 100), ("seed", 1),
                                           ("eval.attacks", ["pgd10"]), ("train.val_n", 64), ("data.batch_size", 32),
                                           ("methods.pgd.steps", 3)])
    straight = trainer.fit(cfg, tmp_path / "straight", progress=False)
    assert abs(summary["clean_acc"] - straight["clean_acc"]) <= 0.08, (summary["clean_acc"], straight["clean_acc"])
    assert abs(summary["robust_acc"]["pgd10"] - straight["robust_acc"]["pgd10"]) <= 0.08, (summary, straight)


def _wait_for(url, seconds=120):
    import urllib.error
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:  # 401 under token authentication: the dashboard is up
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer")


def _stop_head(temp_dir: str) -> list:
    """Stop the Ray head started with ``--temp-dir temp_dir`` and nothing else: ``ray stop`` would
    stop every Ray on the machine. Its processes name the directory on their command lines; its
    workers are their children."""
    head = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    processes = set(head)
    for process in head:
        try:
            processes.update(process.children(recursive=True))
        except psutil.Error:
            pass
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(processes), timeout=30)
    return alive + [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]


@pytest.mark.timeout(900)
def test_ray_job_submit_trains_two_workers_and_writes_tensorboard(tmp_path):
    # `ray start` under token authentication reads a token and generates none: on a fresh machine,
    # with no ~/.ray/auth_token (which conftest's pytest_configure writes), the head would not start
    env = dict(_env(), RAY_AUTH_TOKEN=secrets.token_hex(32))
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="atcd-ray-", dir="/tmp")  # Unix socket paths must stay short
    head = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--num-cpus=2",
                           # the job agent's port is fixed by default (52365): another Ray on the machine holds it
                           f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}"], env=env, capture_output=True, text=True, timeout=300)
    assert head.returncode == 0, head.stderr[-3000:]
    try:
        _wait_for(f"http://127.0.0.1:{port}/api/version")
        out = tmp_path / "job-run"
        # Ray uploads the checkout without its .git: the commit goes with the job (docs/CLUSTER.md).
        # A value git could not give: it reaches summary.json only through the job's environment.
        commit = "c0ffee" * 6 + "c0ff"
        job = subprocess.run(
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{port}", "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"ATCD_RAY_COMMIT": commit}}), "--",
             "python", "-m", "atcd_ray.train", "digits", "--method", "atcd", "--workers", "2", "--epochs", "2",
             "--eval-n", "100", "--out", str(out), "--set", "eval.attacks=[pgd10]", "--set", "train.val_n=64",
             "--quiet"], env=env, capture_output=True, text=True, timeout=800)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    finally:
        left = _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, left
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["epochs"] == 2 and 0 <= summary["robust_acc"]["pgd10"] <= summary["clean_acc"]
    assert summary["provenance"]["commit"] == commit and summary["provenance"]["dirty"] is None  # no .git there
    checkpoints = sorted(p for p in out.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and {p.name for p in checkpoints[-1].iterdir()} == {"last.safetensors", "rank1.safetensors"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/clean_acc", "val/robust_acc", "train/mh_accept_rate", "train/lr",
            "train/images_per_second", "train/epoch_seconds"} <= tags
    assert [e.step for e in events.Scalars("val/robust_acc")] == [1, 2]


@pytest.mark.timeout(300)
def test_a_stale_current_cluster_file_does_not_hang_a_run():
    """A head killed rather than stopped leaves Ray's ray_current_cluster file naming it; plain
    ray.init() then hangs trying to join it (the positive control), init_ray starts its own Ray."""
    temp = tempfile.mkdtemp(dir="/tmp", prefix="r")  # short: Ray's socket paths live under it
    try:
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
        env = dict(_env(), TMPDIR=temp)
        join = "import ray; ray.init(); print(ray.cluster_resources()['CPU'])"
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, timeout=20)
        own = "from atcd_ray.distributed import init_ray; import ray; init_ray(); print(ray.cluster_resources()['CPU'])"
        proc = subprocess.run([sys.executable, "-c", own], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and float(proc.stdout.split()[-1]) == os.cpu_count(), proc.stderr
    finally:
        shutil.rmtree(temp, ignore_errors=True)
