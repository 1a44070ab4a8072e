"""Ray Tune sweeps as a library: the searcher and scheduler for a ``SearchSpace`` (read and
checked in ``search_space.py``), the trials (each a Ray Train run), and the results table.
``python -m atcd_ray.tune`` is the command on top (its help has the format).
"""
from __future__ import annotations

import importlib.util
import functools
import json
import logging
import math
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config
from .core.checkpoint import write_json_atomic
from .search_space import REPEAT, SearchSpace, has_grid
from .storage import is_uri

log = logging.getLogger("atcd_ray.tune")

OBJECTIVE = "objective"
SEARCHER_JSON = "searcher.json"  # a sweep's searcher, seed and fixed first trials, next to its results


def make_searcher(space: SearchSpace, seed: int, concurrent: int):
    """The study's searcher, seeded, with its fixed first trials (which it suggests first: trial 0
    is the first point). Tune wraps a Searcher (tpe, bohb) in a ConcurrencyLimiter itself."""
    points = space.tune_points() or None
    if space.searcher == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=seed))
    if space.searcher == "bohb":
        missing = [name for name in ("hpbandster", "ConfigSpace") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"searcher: bohb needs {' and '.join(missing)} (pip install 'atcd_ray[bohb]'), "
                              "or use searcher: tpe")
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(points_to_evaluate=points, seed=seed)
    from ray.tune.search import BasicVariantGenerator

    # An instance of Tune's default searcher, seeded; it takes the limit itself (Tune only wraps
    # Searchers, not generators, in a ConcurrencyLimiter).
    return BasicVariantGenerator(points_to_evaluate=points, random_state=seed, max_concurrent=concurrent)


def read_searcher(out: Path) -> dict | None:
    """What DIR/searcher.json records of a sweep's search, or None (a sweep from before it)."""
    path = Path(out) / SEARCHER_JSON
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Sizing:
    """How each trial runs: command-line overrides and the Ray Train worker group."""

    overrides: list[tuple[str, Any]]
    workers: tuple[int, int] = (1, 1)  # (min, max): an elastic group where they differ
    gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # restarts of a trial's worker group, from its last checkpoint
    validation: tuple[float, float] = (0.0, 0.0)  # (CPUs, GPUs) of a trial's validation task (train.val_async)

    def __post_init__(self):
        if isinstance(self.workers, int):
            self.workers = (self.workers, self.workers)

    def concurrent_trials(self, cpus: float, gpus: float) -> int:
        """As many trials as the cluster holds worker groups of the most workers (and their
        validation tasks), so no trial waits on resources; at least one, which an elastic trial
        may start with its fewest."""
        from .distributed import group_needs
        val_cpus, val_gpus = self.validation

        def groups(workers: int) -> int:
            need_cpus, need_gpus = group_needs(workers, cpus_per_worker=self.cpus_per_worker, gpu=self.gpu,
                                               validation=self.validation)
            fit = math.floor(cpus / need_cpus + 1e-9)
            return min(fit, math.floor(gpus / need_gpus + 1e-9)) if need_gpus else fit

        low, high = self.workers
        if groups(low) < 1:
            validation = f" and a validation task of {val_cpus:g} CPUs, {val_gpus:g} GPUs" * any(self.validation)
            raise ConfigError(f"one trial needs {low} workers x {self.cpus_per_worker} CPUs"
                              f"{' and a GPU each' if self.gpu else ''}{validation}; "
                              f"the cluster has {cpus:g} CPUs, {gpus:g} GPUs")
        return max(1, groups(high))  # an elastic trial starts smaller on a cluster that has not grown yet


def _trial(config: dict, space: SearchSpace, sizing: Sizing, sweep_dir: str) -> None:
    """One trial: a TorchTrainer whose reports reach Tune. A restarted trial (after a failure or
    ``--resume``) finds its run directory and resumes it from the last checkpoint."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    from .distributed import fit_distributed

    class ReportObjective(TuneReportCallback):
        """Rank 0's epoch record, plus the study's objective (a weighted sum of reported metrics)."""

        reported = 0

        def after_report(self, run_context, metrics, checkpoint):
            if "val_robust_acc" not in metrics[0]:
                return  # inside an epoch, or not validated yet (train.val_async): Tune's schedulers count epochs
            first = {**metrics[0], OBJECTIVE: objective(metrics[0], space.metric)}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)
            self.reported += 1

    cfg = load_config(space.dataset, space.recipe, space.trial_overrides(config) + sizing.overrides)
    cfg.seed += config.get(REPEAT, 0)
    run_dir = Path(sweep_dir) / "runs" / tune.get_context().get_trial_id()
    fit = functools.partial(fit_distributed, cfg, run_dir, workers=sizing.workers, gpu=sizing.gpu,
                            cpus_per_worker=sizing.cpus_per_worker, max_failures=sizing.max_failures)
    if not cfg.train.val_async:
        fit(callbacks=[callback := ReportObjective()])
        reported = callback.reported
    else:
        # An epoch's record reaches Tune from its validation task, which puts it on a queue of this
        # trial's; a thread here passes each to tune.report, in epoch order (Ray validates one
        # checkpoint at a time, in the order reported). Not also through the callback: one route.
        records, forwarded = Queue(actor_options={"num_cpus": 0}), []

        def forward_records():
            for record in iter(records.get, None):
                tune.report(record)
                forwarded.append(record.get("epoch"))

        pump = threading.Thread(target=forward_records, daemon=True)
        pump.start()
        try:
            # The validation task's bundle is the trial's own second one (run_sweep): Tune frees it with the trial.
            fit(callbacks=[], on_validated=ForwardToTune(records, space.metric),
                validation_bundle=(ray.util.get_current_placement_group(), 1))
        finally:
            records.put(None)  # after the last validation: fit returns once every one is done
            pump.join(timeout=60)  # Tune takes a trial's results while its function runs
        reported = len(forwarded)
    last = None if reported else last_validated(run_dir)
    if last is not None:  # a trial restarted after its last epoch, with nothing left to train: that epoch again
        tune.report({**last, OBJECTIVE: objective(last, space.metric)})


def last_validated(run_dir: Path) -> dict | None:
    """The run's last validated epoch record: what Tune gets from a trial that was interrupted
    after its last epoch and, restarted, has nothing left to train (nor to report)."""
    from .run_dir import read_history

    return next((h for h in reversed(read_history(run_dir)) if "val_robust_acc" in h), None)


def objective(record: dict, weights: dict[str, float]) -> float:
    return sum(w * record[k] for k, w in weights.items())


class ForwardToTune:
    """An epoch's validated record, with the study's objective, onto the trial's queue (a
    ``ray.util.queue.Queue``, which a validation task in another process can put to)."""

    def __init__(self, queue, weights: dict[str, float]):
        self.queue, self.weights = queue, weights

    def __call__(self, record: dict) -> None:
        self.queue.put({**record, OBJECTIVE: objective(record, self.weights)})


def check_not_uri(out: str | None) -> None:
    """A sweep's directory (its trials' run directories with it) is a local or shared path."""
    if is_uri(out):
        raise ConfigError(f"--out {out}: a sweep's directory is a local or shared path; a URI is for one run "
                          "(python -m atcd_ray.train --out s3://...)")


def validation_resources(cfg) -> tuple[float, float]:
    """(CPUs, GPUs) a trial's validation task takes beside its workers: none unless train.val_async."""
    return (cfg.train.val_cpus, cfg.train.val_gpus) if cfg.train.val_async else (0.0, 0.0)


def param_space(space: SearchSpace, repeats: int = 1) -> dict:
    """Tune's space. Repeats of a grid become one more grid axis, ``repeat``, which the trial adds
    to the config's seed: repeated configs are independent runs, not copies of one run."""
    from ray import tune

    tune_space = {REPEAT: tune.grid_search(list(range(repeats)))} if repeats > 1 and has_grid(space) else {}
    for name, spec in space.params.items():
        (kind, values), = spec.items()
        bundles = space.bundles(name)
        values = list(bundles) if bundles else values
        tune_space[name] = {"grid": tune.grid_search, "choice": tune.choice}[kind](values) \
            if kind in ("grid", "choice") else {"uniform": tune.uniform, "loguniform": tune.loguniform,
                  "randint": lambda lo, hi: tune.randint(lo, hi + 1)}[kind](*values)  # randint: both ends
    return tune_space


def make_scheduler(space: SearchSpace, epochs: int):
    """ASHA on epochs (one report per epoch), or FIFO: every trial runs to its end.

    ASHA's decisions fall on epochs before the last (``max_t = epochs - 1``, and no stop at
    ``max_t``): a trial that reaches its last epoch has passed every rung, and is not stopped on
    that epoch's report before it has tested its model and written summary.json."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    options = dict(space.scheduler or {})
    name = options.pop("name", "asha")
    if name not in ("asha", "hyperband") or epochs < 2:
        return FIFOScheduler()
    if name == "hyperband":  # BOHB's: the same decisions on epochs before the last
        from ray.tune.schedulers import HyperBandForBOHB

        return HyperBandForBOHB(time_attr="training_iteration", max_t=epochs - 1,
                                reduction_factor=options.get("reduction_factor", 3), stop_last_trials=False)
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs - 1,
                         grace_period=min(options.get("grace_period", 1), epochs - 1),
                         reduction_factor=options.get("reduction_factor", 2), stop_last_trials=False)


def run_sweep(space: SearchSpace, sizing: Sizing, out: Path, *, num_samples: int | None = None, resume: bool = False,
              max_concurrent: int | None = None, trial_failures: int = 1):
    """Run (or resume) the sweep into ``out``; returns Tune's ResultGrid. ``max_concurrent``:
    default, as many trials as the cluster's resources hold now (give it for an autoscaler)."""
    from ray import tune

    from .distributed import init_ray, validation_task_bundle

    out = out.resolve()
    existing = tune.Tuner.can_restore(str(out))
    if existing and not resume:
        raise ConfigError(f"{out} holds a sweep already: pass --resume to continue it, or another --out")
    resume = resume and existing  # --resume on a fresh directory starts the sweep (a retried job)
    recorded = read_searcher(out)
    if resume and recorded and recorded["searcher"] != space.searcher:
        raise ConfigError(f"searcher: {out} was started with searcher {recorded['searcher']}; Tune resumes that "
                          f"search, so the space must say searcher: {recorded['searcher']}")
    repeats = num_samples or space.num_samples
    if len(space.points_to_evaluate) > repeats:
        raise ConfigError(f"--num-samples {repeats}: fewer than the space's {len(space.points_to_evaluate)} "
                          "points_to_evaluate")
    init_ray()
    concurrent = _concurrent_trials(sizing, max_concurrent)
    trainable = tune.with_parameters(_trial, space=space, sizing=sizing, sweep_dir=str(out))
    # The trial function only waits on its TorchTrainer, whose workers reserve the CPUs and GPUs.
    # Tune refuses an empty request, so the function reserves a token 1 MiB of memory, no CPU; and
    # under train.val_async a second bundle, its validation task's (distributed.validation_placement).
    bundles = [{"CPU": 0, "memory": 2**20}, *([validation_task_bundle(*sizing.validation)] * any(sizing.validation))]
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))
    if resume:
        # Tune restores the searcher it pickled (tuner.pkl) and then its state (the experiment
        # directory's searcher-state file: for tpe, the Optuna study with every trial so far, the
        # fixed ones among them): the search goes on where it stopped, and no fresh searcher is made.
        tuner = tune.Tuner.restore(str(out), trainable, resume_errored=True)
    else:
        scheduler = make_scheduler(space, space.config(sizing.overrides).train.epochs)
        seed = space.search_seed if space.search_seed is not None else secrets.randbelow(2**31)
        search_alg = make_searcher(space, seed, concurrent)
        out.mkdir(parents=True, exist_ok=True)
        record = {"searcher": space.searcher, "search_seed": seed, "points_to_evaluate": space.tune_points()}
        write_json_atomic(out / SEARCHER_JSON, record)
        tuner = tune.Tuner(
            trainable, param_space=param_space(space, repeats),
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=space.mode, scheduler=scheduler, search_alg=search_alg,
                                        num_samples=1 if has_grid(space) else repeats,
                                        max_concurrent_trials=concurrent,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(name=out.name, storage_path=str(out.parent),
                                      failure_config=tune.FailureConfig(max_failures=trial_failures)),
        )
    log.info("sweep %s: up to %d trials at a time, results in %s", space.study, concurrent, out)
    return tuner.fit()


def _concurrent_trials(sizing: Sizing, max_concurrent: int | None) -> int:
    """Trials at a time: ``max_concurrent``, or as many as the cluster's resources hold now;
    under train.val_async never more than fit beside their validation tasks."""
    import ray

    if max_concurrent and not any(sizing.validation):
        return max_concurrent
    resources = ray.cluster_resources()
    fits = sizing.concurrent_trials(resources.get("CPU", 0), resources.get("GPU", 0))
    if (max_concurrent or 0) > fits:  # trials filling the cluster would wait at their ends, forever,
        # for validation tasks with no room to start
        raise ConfigError(f"--max-concurrent {max_concurrent}: with train.val_async at most {fits} trials "
                          "fit beside their validation tasks on this cluster")
    return max_concurrent or fits


def results_table(grid, space: SearchSpace, out: Path) -> list[dict]:
    """One row per trial: its params, how it ended, last and best validation metrics, the test
    accuracies of its summary.json (absent for trials ASHA stopped), its number (0: the searcher's
    first, a fixed trial if the space gives any), the searcher and its seed. CSV and Parquet."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    from .run_dir import read_history, read_summary

    recorded = read_searcher(out) or {"searcher": space.searcher, "search_seed": space.search_seed}
    rows = []
    for number, result in enumerate(_searcher_order(grid, space)):
        trial_id = Path(result.path).name
        run = out / "runs" / trial_id
        summary, history = read_summary(run), read_history(run)
        # diverged: stopped by a non-finite loss or weight (trainer.check_not_diverged), a result like any other
        status = "diverged" if (run / "diverged.json").exists() else "error" if result.error \
            else "completed" if summary else "stopped"
        row = {"trial_id": trial_id, **{name: result.config.get(name) for name in space.params},
               REPEAT: result.config.get(REPEAT, 0), "status": status, "epochs": len(history)}
        last = history[-1] if history else {}
        row.update({OBJECTIVE: (result.metrics or {}).get(OBJECTIVE), "val_clean_acc": last.get("val_clean_acc"),
                    "val_robust_acc": last.get("val_robust_acc"),
                    "best_val_robust_acc": max((h["val_robust_acc"] for h in history if "val_robust_acc" in h),
                                               default=None),
                    "train_seconds": last.get("train_seconds")})
        if summary:
            row["test_clean_acc"] = summary["clean_acc"]
            row.update({f"test_{name}_acc": acc for name, acc in summary["robust_acc"].items()})
        row.update(trial_number=number, searcher=recorded["searcher"], search_seed=recorded["search_seed"])
        rows.append(row)
    sign = -1 if space.mode == "max" else 1
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, sign * (r[OBJECTIVE] or 0)))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: [_cell(row.get(c)) for row in rows] for c in columns})
    pyarrow.parquet.write_table(table, out / "results.parquet")
    pyarrow.csv.write_csv(table, out / "results.csv")
    write_json_atomic(out / "study.json", {**vars(space), "search_seed": recorded["search_seed"]})
    return rows


def _searcher_order(grid, space: SearchSpace) -> list:
    """Tune's trials, the fixed ones (``points_to_evaluate``, which the searcher proposes first)
    first in their order, then the others as Tune lists them. Tune lists a fresh sweep's trials in
    the order they were made, but not a resumed one's: the fixed trials are found by their values."""
    def point_of(result) -> int:
        for index, point in enumerate(space.tune_points()):
            if all(_same(result.config.get(name), value) for name, value in point.items()):
                return index
        return len(space.points_to_evaluate)

    return sorted(grid, key=point_of)  # stable: the others keep Tune's order


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _cell(value):
    return str(value) if isinstance(value, (list, dict)) else value
