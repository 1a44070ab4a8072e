"""Ray Tune sweeps as a library: the search space file (``Study``), its checks, the searcher and
scheduler, the trials (each a Ray Train run), and the results table. ``python -m atcd_ray.tune``
is the command on top (its help has the format).
"""
from __future__ import annotations

import importlib.util
import functools
import json
import logging
import math
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_config
from .core.checkpoint import write_text_atomic
from .storage import is_uri

log = logging.getLogger("atcd_ray.tune")

# What a trial reports each epoch that a study may score trials by (trainer.fit's record).
REPORTED = ("val_robust_acc", "val_clean_acc", "train_images_per_second", "train_loss", "train_seconds")
OBJECTIVE = "objective"
REPEAT = "repeat"
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
STUDY_KEYS = ("study", "dataset", "recipe", "fixed", "params", "metric", "mode", "searcher", "points_to_evaluate",
              "scheduler", "num_samples", "search_seed")
SEARCHERS = ("random", "tpe", "bohb")
SCHEDULERS = ("asha", "fifo", "hyperband")  # hyperband: HyperBandForBOHB, searcher bohb's own
SEARCHER_JSON = "searcher.json"  # a sweep's searcher, seed and fixed first trials, next to its results


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
    searcher: str = "random"  # random (grids too) | tpe (Optuna) | bohb (TuneBOHB + HyperBandForBOHB)
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)  # the searcher's fixed first trials
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    num_samples: int = 1
    search_seed: int | None = None  # seeds the searcher, so a rerun samples the same trials (none: drawn, recorded)

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
            overrides += list(bundles[value].items()) if bundles else [(name, _plain(value))]
        return overrides

    def tune_points(self) -> list[dict[str, Any]]:
        """``points_to_evaluate`` as the searcher takes them: a bundle's mapping becomes its label."""
        points = []
        for point in self.points_to_evaluate:
            points.append({name: bundle_label(value) if isinstance(value, dict) else value
                           for name, value in point.items()})
        return points


def _plain(value):
    """A searcher's numpy scalar (BOHB's) as the Python number the config checks expect."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


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
    if "search" in tree:
        raise ConfigError(f"search: renamed searcher: {' | '.join(SEARCHERS)} (auto and optuna: tpe; basic: random)")
    check_keys(tree, path, STUDY_KEYS, ("study", "dataset", "params"))
    metric = tree.get("metric", "val_robust_acc")
    tree["metric"] = {metric: 1.0} if isinstance(metric, str) else metric
    if tree.get("searcher") == "bohb" and "scheduler" not in tree:
        tree["scheduler"] = {"name": "hyperband"}
    study = Study(**tree)
    check_study(study, list(extra))
    return study


def check_study(study: Study, extra: list[tuple[str, Any]]) -> None:
    """Every key of a study and every value a trial can take, against the recipe's config: the
    first offender, as one ConfigError naming its key."""
    if not isinstance(study.params, dict) or not study.params:
        raise ConfigError("params: give at least one searched key")
    if not isinstance(study.fixed, dict):
        raise ConfigError("fixed: expected a mapping of config key to value")
    if not isinstance(study.metric, dict) or not study.metric or any(
            k not in REPORTED or not isinstance(w, (int, float)) for k, w in study.metric.items()):
        raise ConfigError(f"metric: a name or a mapping of name to weight, names from: {', '.join(REPORTED)}")
    if study.mode not in ("max", "min"):
        raise ConfigError(f"mode: must be max or min, got {study.mode!r}")
    if study.searcher not in SEARCHERS:
        raise ConfigError(f"searcher: must be one of {', '.join(SEARCHERS)}; got {study.searcher!r}")
    if not isinstance(study.num_samples, int) or study.num_samples < 1:
        raise ConfigError(f"num_samples: must be an integer >= 1, got {study.num_samples!r}")
    seed = study.search_seed
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"search_seed: must be an integer, got {study.search_seed!r}")
    _check_scheduler(study)

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
    if study.searcher != "random" and _has_grid(study):
        raise ConfigError(f"searcher: {study.searcher} samples; it cannot run a grid (use choice, or searcher: random)")
    _check_points(study, try_config)


def _check_scheduler(study: Study) -> None:
    scheduler = dict(study.scheduler or {})
    name = scheduler.pop("name", None)
    if name not in SCHEDULERS or set(scheduler) - {"grace_period", "reduction_factor"}:
        raise ConfigError("scheduler: {name: asha|fifo|hyperband, grace_period: EPOCHS, reduction_factor: R}")
    if (name == "hyperband") != (study.searcher == "bohb"):
        raise ConfigError("scheduler: searcher bohb runs with {name: hyperband} (HyperBandForBOHB, the default with "
                          "bohb), and hyperband only with searcher bohb")


def _check_points(study: Study, try_config) -> None:
    """Each fixed first trial gives every searched key one value the space can take (a bundle: one
    of its mappings, as the space writes it), and that value passes the config's checks."""
    points = study.points_to_evaluate
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("points_to_evaluate: expected a list of mappings of searched key to value")
    if points and _has_grid(study):
        raise ConfigError("points_to_evaluate: a grid runs every value already; fixed trials are for sampled params")
    for i, point in enumerate(points):
        for name in point:
            if name not in study.params:
                raise ConfigError(f"points_to_evaluate[{i}].{name}: not a searched key; "
                                  f"params: {', '.join(study.params)}")
        for name, spec in study.params.items():
            where = f"points_to_evaluate[{i}].{name}"
            if name not in point:
                raise ConfigError(f"{where}: missing; a fixed trial gives every searched key a value")
            (kind, values), = spec.items()
            value = point[name]
            bundles = study.bundles(name)
            if bundles:
                if not (value in values if isinstance(value, dict) else isinstance(value, str) and value in bundles):
                    raise ConfigError(f"{where}: {value!r} is not one of the bundle's {kind} values")
                value = bundles[value] if isinstance(value, str) else value
                try_config(list(value.items()), where)
                continue
            if kind == "choice":
                fits = any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)
            else:
                number = isinstance(value, int if kind == "randint" else (int, float)) and not isinstance(value, bool)
                fits = number and values[0] <= value <= values[1]
            if not fits:
                raise ConfigError(f"{where}: {value!r} is not in the space ({kind}: {values})")
            try_config([(name, value)], where)


def _has_grid(study: Study) -> bool:
    return any(next(iter(s)) == "grid" for s in study.params.values())


def make_searcher(study: Study, seed: int, concurrent: int):
    """The study's searcher, seeded, with its fixed first trials (which it suggests first: trial 0
    is the first point). Tune wraps a Searcher (tpe, bohb) in a ConcurrencyLimiter itself."""
    points = study.tune_points() or None
    if study.searcher == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=seed))
    if study.searcher == "bohb":
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
    from ray.util.queue import Queue

    from .distributed import fit_distributed

    class ReportObjective(TuneReportCallback):
        """Rank 0's epoch record, plus the study's objective (a weighted sum of reported metrics)."""

        reported = 0

        def after_report(self, run_context, metrics, checkpoint):
            if "val_robust_acc" not in metrics[0]:
                return  # inside an epoch, or not validated yet (train.val_async): Tune's schedulers count epochs
            first = {**metrics[0], OBJECTIVE: objective(metrics[0], study.metric)}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)
            self.reported += 1

    cfg = load_config(study.dataset, study.recipe, study.trial_overrides(config) + sizing.overrides)
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
            fit(callbacks=[], on_validated=ForwardToTune(records, study.metric),
                validation_bundle=(ray.util.get_current_placement_group(), 1))
        finally:
            records.put(None)  # after the last validation: fit returns once every one is done
            pump.join(timeout=60)  # Tune takes a trial's results while its function runs
        reported = len(forwarded)
    last = None if reported else last_validated(run_dir)
    if last is not None:  # a trial restarted after its last epoch, with nothing left to train: that epoch again
        tune.report({**last, OBJECTIVE: objective(last, study.metric)})


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


def run_sweep(study: Study, sizing: Sizing, out: Path, *, num_samples: int | None = None, resume: bool = False,
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
    if resume and recorded and recorded["searcher"] != study.searcher:
        raise ConfigError(f"searcher: {out} was started with searcher {recorded['searcher']}; Tune resumes that "
                          f"search, so the space must say searcher: {recorded['searcher']}")
    repeats = num_samples or study.num_samples
    if len(study.points_to_evaluate) > repeats:
        raise ConfigError(f"--num-samples {repeats}: fewer than the space's {len(study.points_to_evaluate)} "
                          "points_to_evaluate")
    init_ray()
    concurrent = _concurrent_trials(sizing, max_concurrent)
    trainable = tune.with_parameters(_trial, study=study, sizing=sizing, sweep_dir=str(out))
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
        scheduler = make_scheduler(study, study.config(sizing.overrides).train.epochs)
        seed = study.search_seed if study.search_seed is not None else secrets.randbelow(2**31)
        search_alg = make_searcher(study, seed, concurrent)
        out.mkdir(parents=True, exist_ok=True)
        record = {"searcher": study.searcher, "search_seed": seed, "points_to_evaluate": study.tune_points()}
        write_text_atomic(out / SEARCHER_JSON, json.dumps(record, indent=2) + "\n")
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


def results_table(grid, study: Study, out: Path) -> list[dict]:
    """One row per trial: its params, how it ended, last and best validation metrics, the test
    accuracies of its summary.json (absent for trials ASHA stopped), its number (0: the searcher's
    first, a fixed trial if the space gives any), the searcher and its seed. CSV and Parquet."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    from .run_dir import read_history, read_summary

    recorded = read_searcher(out) or {"searcher": study.searcher, "search_seed": study.search_seed}
    rows = []
    for number, result in enumerate(_searcher_order(grid, study)):
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
        row.update(trial_number=number, searcher=recorded["searcher"], search_seed=recorded["search_seed"])
        rows.append(row)
    sign = -1 if study.mode == "max" else 1
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, sign * (r[OBJECTIVE] or 0)))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: [_cell(row.get(c)) for row in rows] for c in columns})
    pyarrow.parquet.write_table(table, out / "results.parquet")
    pyarrow.csv.write_csv(table, out / "results.csv")
    write_text_atomic(out / "study.json", json.dumps({**vars(study), "search_seed": recorded["search_seed"]}, indent=2))
    return rows


def _searcher_order(grid, study: Study) -> list:
    """Tune's trials, the fixed ones (``points_to_evaluate``, which the searcher proposes first)
    first in their order, then the others as Tune lists them. Tune lists a fresh sweep's trials in
    the order they were made, but not a resumed one's: the fixed trials are found by their values."""
    def point_of(result) -> int:
        for index, point in enumerate(study.tune_points()):
            if all(_same(result.config.get(name), value) for name, value in point.items()):
                return index
        return len(study.points_to_evaluate)

    return sorted(grid, key=point_of)  # stable: the others keep Tune's order


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _cell(value):
    return str(value) if isinstance(value, (list, dict)) else value
