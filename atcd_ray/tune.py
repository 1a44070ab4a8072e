"""``python -m atcd_ray.tune SPACE.yaml``: a Ray Tune sweep, one Ray Train run per trial.

    python -m atcd_ray.tune tune_spaces/fashion-mnist_lambda-rho.yaml --epochs 3 --subset 10000
    python -m atcd_ray.tune tune_spaces/fashion-mnist_lambda-rho.yaml --resume   # after an interruption

A space YAML names a dataset (and optionally a recipe), ``fixed`` overrides for every trial, the
searched ``params`` and how to score and schedule trials (tune_spaces/README.md has the format).
Each trial is a Tune function that launches one TorchTrainer (the Train V2 pattern) whose
epoch reports reach Tune through ``TuneReportCallback``; its run directory
(DIR/runs/<trial id>/: metrics.jsonl, summary.json, checkpoints, tb/) is a full training run.
ASHA stops weak trials after ``grace_period`` epochs. At the end DIR/results.csv and
DIR/results.parquet hold one row per trial; ``tensorboard --logdir DIR`` shows every trial.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cli import ArgumentParser, check_launch, markdown_table, run_main, setup_logging, worker_range
from .config import ConfigError, load_config, parse_override
from .storage import is_uri

log = logging.getLogger("atcd_ray.tune")

# What a trial reports each epoch that a study may score trials by (trainer.fit's record).
REPORTED = ("val_robust_acc", "val_clean_acc", "train_images_per_second", "train_loss", "train_seconds")
OBJECTIVE = "objective"
REPEAT = "repeat"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
STUDY_KEYS = ("study", "dataset", "recipe", "fixed", "params", "metric", "mode", "search", "scheduler",
              "num_samples", "search_seed")


@dataclass
class Study:
    """A search space file, validated."""

    study: str
    dataset: str
    params: dict[str, dict[str, list]]  # config key (or a bundle's label) -> {kind: values}
    recipe: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, float] = field(default_factory=lambda: {"val_robust_acc": 1.0})  # weights
    mode: str = "max"
    search: str = "auto"  # auto | basic (grid and random) | optuna
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    num_samples: int = 1
    search_seed: int | None = None  # seeds the basic search's draws, so a rerun samples the same trials

    def __post_init__(self):
        if self.recipe:  # relative to where the command runs: Tune runs each trial in a directory of its own
            self.recipe = str(Path(self.recipe).resolve())

    def bundles(self, name: str) -> dict[str, dict] | None:
        """A param whose values are mappings of overrides (e.g. T and K together): label -> mapping."""
        (kind, values), = self.params[name].items()
        if kind in ("grid", "choice") and isinstance(values[0], dict):
            return {bundle_label(v): v for v in values}
        return None

    def config(self, overrides: list[tuple[str, Any]] = ()):
        """The recipe, then ``fixed``, then ``overrides``."""
        return load_config(self.dataset, self.recipe, [*self.fixed.items(), *overrides])

    def trial_overrides(self, trial_config: dict) -> list[tuple[str, Any]]:
        """``fixed``, then each param's sampled value (a bundle's label expands to its overrides)."""
        overrides = list(self.fixed.items())
        for name, value in trial_config.items():
            if name == REPEAT:
                continue
            bundles = self.bundles(name)
            overrides += list(bundles[value].items()) if bundles else [(name, value)]
        return overrides


def bundle_label(overrides: dict) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items())


def read_spec(path: Path, what: str) -> dict:
    """A YAML file of a search space or a study, as a mapping, or one ConfigError line why not."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return tree


def check_keys(tree: dict, path: Path, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """No key outside ``allowed``, every key of ``required``: the first offender, by name."""
    unknown = sorted(set(tree) - set(allowed))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {path.name}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in tree:
            raise ConfigError(f"{key}: required in {path.name}")


def load_study(path: str | Path, extra: list[tuple[str, Any]] = ()) -> Study:
    """Read and check a space file: every key and every value a trial can take is validated
    against the recipe's config, so a bad space fails here, with the key, before Ray starts."""
    path = Path(path)
    tree = read_spec(path, "search space")
    if "budgets" in tree:
        raise ConfigError(f"{path} is a budget study: run it with python -m atcd_ray.study {path}")
    check_keys(tree, path, STUDY_KEYS, ("study", "dataset", "params"))
    metric = tree.get("metric", "val_robust_acc")
    tree["metric"] = {metric: 1.0} if isinstance(metric, str) else metric
    study = Study(**tree)
    _check(study, list(extra))
    return study


def _check(study: Study, extra: list[tuple[str, Any]]) -> None:
    if not isinstance(study.params, dict) or not study.params:
        raise ConfigError("params: give at least one searched key")
    if not isinstance(study.fixed, dict):
        raise ConfigError("fixed: expected a mapping of config key to value")
    if not isinstance(study.metric, dict) or not study.metric or any(
            k not in REPORTED or not isinstance(w, (int, float)) for k, w in study.metric.items()):
        raise ConfigError(f"metric: a name or a mapping of name to weight, names from: {', '.join(REPORTED)}")
    if study.mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min, got {study.mode!r}")
    if study.search not in ("auto", "basic", "optuna"):
        raise ConfigError(f"search: must be auto, basic or optuna, got {study.search!r}")
    if not isinstance(study.num_samples, int) or study.num_samples < 1:
        raise ConfigError(f"num_samples: must be an integer >= 1, got {study.num_samples!r}")
    seed = study.search_seed
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"search_seed: must be an integer, got {study.search_seed!r}")
    scheduler = dict(study.scheduler or {})
    if scheduler.pop("name", None) not in ("asha", "fifo") or set(scheduler) - {"grace_period", "reduction_factor"}:
        raise ConfigError("scheduler: {name: asha|fifo, grace_period: EPOCHS, reduction_factor: R}")

    def try_config(overrides, where):
        try:
            study.config([*overrides, *extra])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    try_config([], "fixed")
    if REPEAT in study.params:
        raise ConfigError(f"params.{REPEAT}: reserved for the repeats of a grid (num_samples)")
    for name, spec in study.params.items():
        where = f"params.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)}, e.g. {{grid: [1, 2, 4]}}")
        (kind, values), = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: empty; give a non-empty list")
        if kind in ("grid", "choice"):
            for value in values:
                bundle = isinstance(value, dict)
                if bundle != isinstance(values[0], dict) or (bundle and not value):
                    raise ConfigError(f"{where}.{kind}: mix of mappings and values, or an empty mapping")
                try_config(list(value.items()) if bundle else [(name, value)], where)
            continue
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
            raise ConfigError(f"{where}.{kind}: expected [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}.loguniform: low must be > 0, got {values[0]}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}.randint: bounds must be integers, got {values}")
        for value in values:
            try_config([(name, value)], where)
    if study.search == "optuna" and _has_grid(study):
        raise ConfigError("search: optuna samples; it cannot run a grid (use choice, or search: basic)")


def _has_grid(study: Study) -> bool:
    return any(next(iter(s)) == "grid" for s in study.params.values())


def uses_optuna(study: Study) -> bool:
    sampled = any(next(iter(s)) != "grid" for s in study.params.values())
    if study.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search: optuna is not installed (pip install optuna), or use search: basic")
        return True
    return study.search == "auto" and sampled and not _has_grid(study) and importlib.util.find_spec("optuna") is not None


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
        val_cpus, val_gpus = self.validation

        def groups(workers: int) -> int:
            fit = math.floor(cpus / (workers * self.cpus_per_worker + val_cpus) + 1e-9)
            return min(fit, math.floor(gpus / ((workers if self.gpu else 0) + val_gpus) + 1e-9)) \
                if self.gpu or val_gpus else fit

        low, high = self.workers
        if groups(low) < 1:
            validation = f" and a validation task of {val_cpus:g} CPUs, {val_gpus:g} GPUs" * any(self.validation)
            raise ConfigError(f"one trial needs {low} workers x {self.cpus_per_worker} CPUs"
                              f"{' and a GPU each' if self.gpu else ''}{validation}; "
                              f"the cluster has {cpus:g} CPUs, {gpus:g} GPUs")
        return max(1, groups(high))  # an elastic trial starts smaller on a cluster that has not grown yet


def _trial(config: dict, study: Study, sizing: Sizing, sweep_dir: str) -> None:
    """One trial: a TorchTrainer whose reports reach Tune. A restarted trial (after a failure or
    ``--resume``) finds its run directory and resumes it from the last checkpoint."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .distributed import fit_distributed

    class ReportObjective(TuneReportCallback):
        """Rank 0's epoch record, plus the study's objective (a weighted sum of reported metrics)."""

        def after_report(self, run_context, metrics, checkpoint):
            if "val_robust_acc" not in metrics[0]:
                return  # inside an epoch, or not validated yet (train.val_async): Tune's schedulers count epochs
            first = {**metrics[0], OBJECTIVE: objective(metrics[0], study.metric)}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    cfg = load_config(study.dataset, study.recipe, study.trial_overrides(config) + sizing.overrides)
    cfg.seed += config.get(REPEAT, 0)
    run_dir = Path(sweep_dir) / "runs" / tune.get_context().get_trial_id()
    report = ReportObjective()
    # Under train.val_async an epoch's record reaches Tune from its validation task, through the
    # queue Ray's callback puts reports in (a private attribute of it: tests/test_async_validation.py
    # fails if the records stop arriving).
    forward = ForwardToTune(report._training_actor_item_queue, study.metric) if cfg.train.val_async else None
    # The validation task's bundle is the trial's own second one (run_sweep): Tune frees it with the trial.
    validation_bundle = (ray.util.get_current_placement_group(), 1) if cfg.train.val_async else None
    fit_distributed(cfg, run_dir, sizing.workers, sizing.gpu, sizing.cpus_per_worker, sizing.max_failures,
                    callbacks=[report], on_validated=forward, validation_bundle=validation_bundle)


def objective(record: dict, weights: dict[str, float]) -> float:
    return sum(w * record[k] for k, w in weights.items())


class ForwardToTune:
    """An epoch's validated record, with the study's objective, to the trial's Tune session."""

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


def param_space(study: Study, repeats: int = 1) -> dict:
    """Tune's space. Repeats of a grid become one more grid axis, ``repeat``, which the trial adds
    to the config's seed: repeated configs are independent runs, not copies of one run."""
    from ray import tune

    space = {REPEAT: tune.grid_search(list(range(repeats)))} if repeats > 1 and _has_grid(study) else {}
    for name, spec in study.params.items():
        (kind, values), = spec.items()
        bundles = study.bundles(name)
        values = list(bundles) if bundles else values
        space[name] = {"grid": tune.grid_search, "choice": tune.choice}[kind](values) if kind in ("grid", "choice") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform,
                  "randint": lambda lo, hi: tune.randint(lo, hi + 1)}[kind](*values)  # randint: both ends
    return space


def make_scheduler(study: Study, epochs: int):
    """ASHA on epochs (one report per epoch), or FIFO: every trial runs to its end.

    ASHA's decisions fall on epochs before the last (``max_t = epochs - 1``, and no stop at
    ``max_t``): a trial that reaches its last epoch has passed every rung, and is not stopped on
    that epoch's report before it has tested its model and written summary.json."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    options = dict(study.scheduler or {})
    if options.pop("name", "asha") != "asha" or epochs < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs - 1,
                         grace_period=min(options.get("grace_period", 1), epochs - 1),
                         reduction_factor=options.get("reduction_factor", 2), stop_last_trials=False)


def run_sweep(study: Study, sizing: Sizing, out: Path, num_samples: int | None = None, resume: bool = False,
              max_concurrent: int | None = None, trial_failures: int = 1):
    """Run (or resume) the sweep into ``out``; returns Tune's ResultGrid. ``max_concurrent``:
    default, as many trials as the cluster's resources hold now (give it for an autoscaler)."""
    import ray
    from ray import tune

    from .distributed import init_ray, validation_task_bundle

    out = out.resolve()
    existing = tune.Tuner.can_restore(str(out))
    if existing and not resume:
        raise ConfigError(f"{out} holds a sweep already: pass --resume to continue it, or another --out")
    resume = resume and existing  # --resume on a fresh directory starts the sweep (a retried job)
    init_ray()
    resources = ray.cluster_resources()
    concurrent = max_concurrent
    if not max_concurrent or any(sizing.validation):
        fits = sizing.concurrent_trials(resources.get("CPU", 0), resources.get("GPU", 0))
        if (max_concurrent or 0) > fits:  # trials filling the cluster would wait at their ends, forever,
            # for validation tasks with no room to start
            raise ConfigError(f"--max-concurrent {max_concurrent}: with train.val_async at most {fits} trials "
                              "fit beside their validation tasks on this cluster")
        concurrent = max_concurrent or fits
    trainable = tune.with_parameters(_trial, study=study, sizing=sizing, sweep_dir=str(out))
    # The trial function only waits on its TorchTrainer, whose workers reserve the CPUs and GPUs.
    # Tune refuses an empty request, so the function reserves a token 1 MiB of memory, no CPU; and
    # under train.val_async a second bundle, its validation task's (distributed.validation_placement).
    bundles = [{"CPU": 0, "memory": 2**20}, *([validation_task_bundle(*sizing.validation)] * any(sizing.validation))]
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))
    if resume:
        tuner = tune.Tuner.restore(str(out), trainable, resume_errored=True)
    else:
        scheduler = make_scheduler(study, study.config(sizing.overrides).train.epochs)
        if uses_optuna(study):
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=study.search_seed)
        else:
            from ray.tune.search import BasicVariantGenerator

            # An instance of Tune's default searcher, seeded; it takes the limit itself (Tune only
            # wraps Searchers, not generators, in a ConcurrencyLimiter).
            search_alg = BasicVariantGenerator(random_state=study.search_seed, max_concurrent=concurrent)
        repeats = num_samples or study.num_samples
        tuner = tune.Tuner(
            trainable, param_space=param_space(study, repeats),
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=study.mode, scheduler=scheduler, search_alg=search_alg,
                                        num_samples=1 if _has_grid(study) else repeats,
                                        max_concurrent_trials=concurrent,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(name=out.name, storage_path=str(out.parent),
                                      failure_config=tune.FailureConfig(max_failures=trial_failures)),
        )
    log.info("sweep %s: up to %d trials at a time, results in %s", study.study, concurrent, out)
    return tuner.fit()


def results_table(grid, study: Study, out: Path) -> list[dict]:
    """One row per trial: its params, how it ended, last and best validation metrics, and the
    test accuracies of its summary.json (absent for trials ASHA stopped). CSV and Parquet."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    from .trainer import read_history, read_summary

    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        run = out / "runs" / trial_id
        summary, history = read_summary(run), read_history(run)
        # diverged: stopped by a non-finite loss or weight (trainer.check_not_diverged), a result like any other
        status = "diverged" if (run / "diverged.json").exists() else "error" if result.error \
            else "completed" if summary else "stopped"
        row = {"trial_id": trial_id, **{name: result.config.get(name) for name in study.params},
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
        rows.append(row)
    sign = -1 if study.mode == "max" else 1
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, sign * (r[OBJECTIVE] or 0)))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: [_cell(row.get(c)) for row in rows] for c in columns})
    pyarrow.parquet.write_table(table, out / "results.parquet")
    pyarrow.csv.write_csv(table, out / "results.csv")
    (out / "study.json").write_text(json.dumps(vars(study), indent=2))
    return rows


def _cell(value):
    return str(value) if isinstance(value, (list, dict)) else value


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="search space YAML (tune_spaces/)")
    p.add_argument("--epochs", type=int, help="passes over the training data per trial (ASHA's max_t)")
    p.add_argument("--subset", type=int, help="train each trial on the first N training examples")
    p.add_argument("--eval-n", type=int, help="evaluate each trial on the first N test examples")
    p.add_argument("--num-samples", type=int, help="samples of the space (a grid is repeated this many times)")
    p.add_argument("--workers", type=worker_range, default=(1, 1), metavar="N|MIN-MAX",
                   help="Ray Train workers per trial (DDP from 2); MIN-MAX: elastic")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per Ray Train worker")
    p.add_argument("--max-failures", type=int, default=2, help="restarts of a trial's workers, from its checkpoint")
    p.add_argument("--out", help="sweep directory (default: runs/sweeps/<study>)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at a time (default: as many as the cluster's CPUs/GPUs hold now)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --out (start it if there is none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every trial (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workers[0] < 1 or args.cpus_per_worker <= 0 or args.max_failures < 0 or \
            (args.num_samples or 1) < 1 or (args.max_concurrent or 1) < 1:
        raise ConfigError("--workers, --num-samples and --max-concurrent must be >= 1, --cpus-per-worker > 0, "
                          "--max-failures >= 0")
    flags = {"train.epochs": args.epochs, "data.subset": args.subset, "eval.n": args.eval_n}
    overrides = [(k, v) for k, v in flags.items() if v is not None] + [parse_override(s) for s in args.set]
    study = load_study(args.space, overrides)
    check_launch(study.config(overrides), args.workers[1])  # before any trial starts
    check_not_uri(args.out)
    out = Path(args.out or f"runs/sweeps/{study.study}")
    setup_logging()
    sizing = Sizing(overrides, args.workers, args.gpu, args.cpus_per_worker, args.max_failures,
                    validation=validation_resources(study.config(overrides)))
    grid = run_sweep(study, sizing, out, args.num_samples, args.resume, args.max_concurrent)
    rows = results_table(grid, study, out.resolve())
    shown = ["trial_id", *study.params, "status", "epochs", OBJECTIVE, "val_clean_acc", "val_robust_acc",
             *[c for c in rows[0] if c.startswith("test_")]] if rows else []
    print(markdown_table([{**r, **{p: str(r[p]) for p in study.params}} for r in rows], shown))
    print(f"results: {out / 'results.csv'} and results.parquet; tensorboard --logdir {out}")
    errors = [r["trial_id"] for r in rows if r["status"] == "error"]
    if errors:
        print(f"error: {len(errors)} trial(s) failed: {', '.join(errors)}; --resume retries them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
