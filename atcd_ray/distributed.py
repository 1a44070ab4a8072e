"""Ray Train: the in-process training loop (``trainer.fit``) in N workers of a TorchTrainer.

Ray is imported here, lazily in ``sweep.py`` (Tune) and in ``evaluate.py`` (its actor pool), and
nowhere else. Each worker runs ``fit`` with a ``RayGroup``: DDP through
``ray.train.torch.prepare_model`` (with 2+ workers), its own shard of every split, and a
checkpoint reported to Ray after every epoch. Rank 0 writes the run directory's files
(summary.json, metrics.jsonl, last/best.safetensors, tb/); every rank's checkpoint file (its
persistent perturbation or ATCD chain, its RNG) is merged by Ray into one checkpoint directory.

Ray's run directory is the run directory itself (``storage_path`` = its parent, ``name`` = its
name), so rerunning the same command resumes from the latest checkpoint, and a worker that
dies makes Ray restart the group from it (``FailureConfig``). Checkpoints inside an epoch
(``train.checkpoint_steps``, and one on a preemption notice) are reported to Ray too, so a
restart continues mid-epoch. With ``workers=(min, max)`` the group is elastic: a restart may
have another size, and the trainer re-cuts the per-rank state for it (``resume.resume_from``).

Under ``train.val_async`` each epoch's checkpoint is reported for validation (Ray Train's
``ValidationConfig``): Ray's controller runs ``EpochValidator`` on it as a task with resources of
its own (reserved for the run in a placement group), one at a time and in order, keeps the
checkpoint until it is validated, and reruns the validations a restart interrupted; the workers
train on meanwhile.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, ValidationConfig
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import Config, ConfigError, config_from_dict
from .core.methods.base import weighted_mean_hook
from .factories import build_splits_of
from .group import Group
from .run_dir import check_not_diverged, read_validations
from .storage import RunUpload, download_run, is_uri
from .trainer import fit
from .validation import validate_checkpoint

log = logging.getLogger("atcd_ray")

# An EpochValidator's data, per worker process (config and device -> splits): Ray runs the tasks
# of a run one after the other, mostly in the same process.
_VALIDATION_SPLITS: dict = {}


class RayGroup(Group):
    def __init__(self, validates_async: bool = False):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.validates_async = validates_async
        self.restored: Path | None = None  # a local copy of Ray's checkpoint, removed after the run
        self.notice_answered = False

    def wrap(self, model, rank_weight=1.0):
        # No buffer broadcast at each forward: a method may forward a different number of times
        # on different ranks (ATCD re-runs the forward after an M-H rejection), and a broadcast
        # there would deadlock. BatchNorm running statistics are therefore per rank; rank 0's
        # are the ones checkpointed and evaluated.
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
        if rank_weight != 1.0:  # ranks with different numbers of rows: a weighted mean of their gradients
            model.register_comm_hook(rank_weight, weighted_mean_hook)
        return model

    def preempted(self) -> bool:
        # Ray's answer is rank 0's, broadcast (a collective): every rank decides alike. One
        # checkpoint per notice; Ray restarts the group from it once the node has gone.
        if self.notice_answered or ray.train.get_preemption_info() is None:
            return False
        self.notice_answered = True
        log.info("preemption notice: checkpointing now")
        return True

    def restore_dir(self, out: Path) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self.restored = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="atcd-restore-")))
        return self.restored

    def report(self, record: dict, checkpoint_file: Path, validate: bool = False) -> None:
        with tempfile.TemporaryDirectory(prefix="atcd-report-") as staging:
            shutil.copy2(checkpoint_file, Path(staging) / checkpoint_file.name)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(staging), validation=validate)

    def wait_for_validations(self) -> None:
        log.info("waiting for the last validations")
        ray.train.get_all_reported_checkpoints()  # returns once none is pending validation


class EpochValidator:
    """Ray Train's validation function under ``train.val_async``: ``validation.validate_checkpoint``
    on an epoch's reported checkpoint, in a task with ``train.val_cpus`` CPUs (torch threads) and
    ``train.val_gpus`` GPUs. ``on_validated``: called with the epoch's record, validation
    included (a Tune trial passes it on to Tune). Returns the validation metrics, which Ray merges
    into the checkpoint's: under ``train.ema`` the weight average's, and the raw weights' as
    ``val_*_acc_raw`` (the checkpoint carries both)."""

    def __init__(self, cfg: Config, out: Path, on_validated=None):
        self.cfg, self.out, self.on_validated = cfg.to_json(), str(out), on_validated

    def __call__(self, checkpoint: ray.train.Checkpoint, **_) -> dict:
        import torch

        from .cli import setup_logging

        setup_logging()
        cfg = config_from_dict(json.loads(self.cfg))
        torch.set_num_threads(max(1, int(cfg.train.val_cpus)))
        device = torch.device("cuda" if cfg.train.val_gpus > 0 else "cpu")
        key = (self.cfg, str(device))
        if key not in _VALIDATION_SPLITS:  # tasks reuse their worker process: load the data once there
            _VALIDATION_SPLITS.clear()
            _VALIDATION_SPLITS[key] = build_splits_of(cfg, device)
        done_before = set(read_validations(Path(self.out)))
        with checkpoint.as_directory() as directory:
            record = validate_checkpoint(cfg, Path(directory) / "last.safetensors", Path(self.out), device,
                                         splits=_VALIDATION_SPLITS[key])
        log.info("validated epoch %d: val_clean_acc=%.4g val_robust_acc=%.4g%s (%.0f s)", record["epoch"],
                 record["val_clean_acc"], record["val_robust_acc"],
                 f" (raw weights: {record['val_robust_acc_raw']:.4g})" if "val_robust_acc_raw" in record else "",
                 record["val_seconds"])
        if self.on_validated is not None and record["epoch"] not in done_before:  # once per epoch, reruns too
            self.on_validated(record)
        return {key: record[key] for key in ("val_clean_acc", "val_robust_acc", "val_clean_acc_raw",
                                             "val_robust_acc_raw") if key in record}


def worker_threads(reserved: int) -> int:
    """A worker's torch threads: the CPUs reserved for it, no more, and no more than
    ATCD_RAY_WORKER_THREADS where its environment sets it (the test suite's two test processes on
    two cores set 1). Not OMP_NUM_THREADS: Ray's cluster launcher exports 1 for every node."""
    try:
        cap = int(os.environ.get("ATCD_RAY_WORKER_THREADS", ""))
    except ValueError:
        return reserved
    return min(reserved, cap) if cap > 0 else reserved


def _worker(config: dict) -> None:
    import torch

    from .cli import setup_logging

    setup_logging()
    torch.set_num_threads(worker_threads(config["threads"]))
    group = RayGroup(config["validates_async"])
    out, publish = config["out"], None
    if is_uri(out):  # the run's files are written here and copied there (rank 0)
        # One scratch directory per run and rank, emptied on start: a killed worker's is reused.
        digest = hashlib.sha1(out.encode()).hexdigest()[:12]
        out = Path(tempfile.gettempdir()) / f"atcd-run-{digest}-rank{group.rank}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if group.rank == 0:
            download_run(config["out"], out)
            publish = RunUpload(out, config["out"])
    try:
        # Progress: rank 0 logs a line every few seconds, which Ray forwards to the driver.
        fit(config_from_dict(config["cfg"]), out, progress=config["progress"],
            device=ray.train.torch.get_device(), group=group, publish=publish)
    finally:
        if group.restored is not None:
            shutil.rmtree(group.restored, ignore_errors=True)
        if out != config["out"]:
            shutil.rmtree(out, ignore_errors=True)


_own_dashboard = ""  # the RAY_API_SERVER_ADDRESS this process set for the local Ray it started


def init_ray() -> None:
    """Join RAY_ADDRESS (``ray job submit`` sets it) or start a local Ray of this process's own,
    dashboard on 127.0.0.1. ``address="local"``: without it ``ray.init()`` joins the cluster Ray's
    ``ray_current_cluster`` file names, which a killed ``ray start --head`` leaves behind (dead).

    A local Ray's processes are told its dashboard (RAY_API_SERVER_ADDRESS, which they inherit from
    this one): Ray Train's placement-group cleaner asks the state API whether the run's controller
    lives, and without an address that API looks for Ray instances on the machine and fails
    (its thread dies, printing a traceback) when another Ray runs beside this one."""
    global _own_dashboard
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # A local instance is this machine alone, which no cloud drains: Ray Train's preemption watcher
    # (an actor per run, started with every worker group) would watch nothing, and Ray 2.60 logs
    # an error line as it starts one. The processes this Ray starts inherit the setting.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if os.environ.get("RAY_API_SERVER_ADDRESS", _own_dashboard) == _own_dashboard:  # unset, or ours
        port = free_port()
        _own_dashboard = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
    else:  # the caller's choice
        ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the dashboard binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def even_share_of_cpus(workers: int, reserved: float = 0.0) -> int:
    """The cluster's CPUs less ``reserved`` split evenly over the workers, at least one each: on
    one machine a single worker gets every core (Ray would otherwise give it one, and torch one
    thread)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) - reserved) // workers)


def group_needs(workers: int, *, cpus_per_worker: float, gpu: bool,
                validation: tuple[float, float]) -> tuple[float, float]:
    """(CPUs, GPUs) that a group of ``workers`` takes with its validation task of (CPUs, GPUs)."""
    return workers * cpus_per_worker + validation[0], (workers if gpu else 0) + validation[1]


def check_room_for_validation(cfg: Config, workers: int, cpus_per_worker: float, gpu: bool) -> None:
    """Under ``train.val_async`` the validation task needs resources beside the workers': at the
    end the workers wait for it, and a task that could only start once they are gone would never
    start."""
    t, have = cfg.train, ray.cluster_resources()
    if gpu and not t.val_gpus:
        log.warning("train.val_async: the workers have GPUs and the validation task none (train.val_gpus=0): "
                    "it validates on %g CPUs, and the run waits for it at the end", t.val_cpus)
    need_cpus, need_gpus = group_needs(workers, cpus_per_worker=cpus_per_worker, gpu=gpu,
                                       validation=(t.val_cpus, t.val_gpus))
    if have.get("CPU", 0) + 1e-9 < need_cpus or have.get("GPU", 0) + 1e-9 < need_gpus:
        gpus = " and a GPU" if gpu else ""
        raise ConfigError(f"train.val_async: {workers} worker(s) x {cpus_per_worker:g} CPUs{gpus} "
                          f"and a validation task of {t.val_cpus:g} CPUs, {t.val_gpus:g} GPUs need {need_cpus:g} CPUs, "
                          f"{need_gpus:g} GPUs; the cluster has {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} "
                          "GPUs. Lower train.val_cpus/val_gpus or the workers, or validate on the workers "
                          "(train.val_async=false)")


def validation_task_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """The placement-group bundle of a validation task of ``cpus`` CPUs and ``gpus`` GPUs."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


@contextlib.contextmanager
def validation_placement(cfg: Config, given: tuple | None, report_every_s: float = 60.0):
    """Where the validation task runs under ``train.val_async``, as (placement group, bundle index),
    reserved for the whole run rather than found free each epoch: at the end the workers wait for
    the last validation, and on a shared cluster a task that had to find free resources could wait
    behind other work for as long as that work runs. ``given``: a Tune trial's own group and the
    bundle ``sweep.run_sweep`` added for it (Tune frees it with the trial, however the trial ends);
    else a group is reserved here, waiting until the cluster grants it (as Ray Train waits for its
    workers), and removed after the run. Without ``train.val_async``: ``given`` (None)."""
    if not cfg.train.val_async or given is not None:
        yield given
        return
    bundle = validation_task_bundle(cfg.train.val_cpus, cfg.train.val_gpus)
    group = ray.util.placement_group([bundle])
    try:
        while not ray.wait([group.ready()], timeout=report_every_s)[0]:
            log.info("waiting for the cluster to grant the validation task's %s", bundle)
        yield group, 0
    finally:
        ray.util.remove_placement_group(group)


def fit_distributed(cfg: Config, out_dir: str | Path, *, workers: int | tuple[int, int], gpu: bool = False,
                    cpus_per_worker: float | None = None, max_failures: int = 3, callbacks: list | None = None,
                    progress: bool = True, resize_check_seconds: float = 60.0, on_validated=None,
                    validation_bundle: tuple | None = None) -> Path | str:
    """Train through Ray Train; returns the run directory (holding summary.json). ``workers``: a
    number, or (min, max) for an elastic group, which Ray starts with what the cluster has and
    resizes (from the latest checkpoint) as nodes come and go, looking every
    ``resize_check_seconds``. ``callbacks``: Ray Train callbacks, e.g. the one that forwards
    reports to a Tune trial. ``cpus_per_worker`` None: ``even_share_of_cpus`` of the most workers
    (less a validation task's, under ``train.val_async``). ``on_validated``: ``EpochValidator``'s;
    ``validation_bundle``: ``validation_placement``'s ``given``.
    ``out_dir`` may be a URI (``s3://bucket/runs/name``): Ray keeps its checkpoints there, and rank 0
    copies the run's files there as it writes them (``storage.RunUpload``)."""
    remote = is_uri(out_dir)
    if remote and cfg.train.val_async:
        raise ConfigError("train.val_async writes the run directory from its own task: it needs a local or "
                          "shared --out, not a URI")
    out = out_dir.rstrip("/") if remote else Path(out_dir).resolve()
    if not remote:
        out.mkdir(parents=True, exist_ok=True)
    storage_path, name = out.rsplit("/", 1) if remote else (str(out.parent), out.name)
    init_ray()
    low, high = (workers, workers) if isinstance(workers, int) else workers
    if low < high and not cfg.train.checkpoint_steps:
        log.warning("an elastic group resizes by restarting from the latest checkpoint: without "
                    "train.checkpoint_steps each resize loses the epoch so far")
    val_async = cfg.train.val_async
    cpus_per_worker = cpus_per_worker or even_share_of_cpus(high, cfg.train.val_cpus if val_async else 0.0)
    if val_async:
        check_room_for_validation(cfg, high, cpus_per_worker, gpu)
    with validation_placement(cfg, validation_bundle) as placement:
        # retry_exceptions: a validation is seeded and its writes idempotent, so a rerun is safe.
        validation = ValidationConfig(EpochValidator(cfg, out, on_validated), ray_remote_kwargs={
            "num_cpus": cfg.train.val_cpus, "num_gpus": cfg.train.val_gpus, "max_retries": 3,
            "retry_exceptions": True, "scheduling_strategy": PlacementGroupSchedulingStrategy(*placement),
        }) if val_async else None
        trainer = ray.train.torch.TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg.to_dict(), "out": str(out), "threads": max(1, int(cpus_per_worker)),
                               "progress": progress, "validates_async": val_async},
            scaling_config=ScalingConfig(num_workers=high if low == high else (low, high), use_gpu=gpu,
                                         elastic_resize_monitor_interval_s=resize_check_seconds,
                                         resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}),
            run_config=RunConfig(
                name=name, storage_path=storage_path, callbacks=callbacks,
                # A preemption is not a failure: Ray retries those without limit (max_preemption_failures).
                failure_config=FailureConfig(max_failures=max_failures),
                # The latest only, the one a restart resumes from (inside an epoch too); the best by
                # validation is the run directory's best.safetensors.
                checkpoint_config=CheckpointConfig(num_to_keep=1)),
            validation_config=validation,
        )
        try:
            result = trainer.fit()
            if result.error:
                raise result.error
        except Exception:
            _check_not_diverged(out)  # a worker's non-finite loss: its one line, not Ray's traceback
            raise
    return out


def _check_not_diverged(out: Path | str) -> None:
    if is_uri(out):
        with tempfile.TemporaryDirectory() as copy:
            check_not_diverged(download_run(out, Path(copy)))
    else:
        check_not_diverged(out)
