"""Budget studies as a library: the spec (``BudgetStudy``), each cell's sweep, the winners, the
final runs, AutoAttack on them, and the record kept in git. ``python -m atcd_ray.study`` is the
command on top (its help has the format).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cli import check_launch
from .config import ConfigError, load_config
from .core.checkpoint import save_weights_only, write_json_atomic
from .core.methods import METHODS
from .core.models import MODELS
from .search_space import SEARCHERS, SearchSpace, check_keys, check_search_space, read_spec
from .sweep import OBJECTIVE, Sizing, results_table, run_sweep, validation_resources

log = logging.getLogger("atcd_ray.study")

SPEC_KEYS = ("study", "dataset", "recipe", "reference", "models", "budgets", "trials", "search_seed", "searcher",
             "points_to_evaluate", "search", "common", "methods", "final", "final_seeds", "autoattack_n", "ema",
             "reject_collapsed")
# Spec keys later than the first recorded studies, with their defaults (see BudgetStudy.recorded)
LATER_KEYS = {"searcher": "random", "points_to_evaluate": None, "ema": None, "reject_collapsed": False}


@dataclass
class BudgetStudy:
    """A budget study's YAML, validated (tune_spaces/fashion-mnist_budget.yaml has the format)."""

    study: str
    dataset: str
    models: list[str]
    budgets: list[float]
    methods: dict[str, dict[str, Any]]  # searched method -> its own params (tune's format)
    final_seeds: list[int]  # per budget: seeds of each winner's final run
    autoattack_n: list[int]  # per budget: AutoAttack's test images (0: none)
    recipe: str | None = None
    reference: str = "natural"  # one run per budget at the recipe's settings
    trials: int = 6
    search_seed: int = 0
    search: dict[str, Any] = field(default_factory=dict)  # overrides of every search trial
    common: dict[str, Any] = field(default_factory=dict)  # params every searched method searches
    final: dict[str, Any] = field(default_factory=dict)  # overrides of every final run
    searcher: str = "random"  # random | tpe (bohb stops trials early; a budget study's spend their budget)
    points_to_evaluate: dict | None = None  # searched method -> its fixed first trials
    # Weight-averaged finals: {decay, budgets, top}: at each of those budgets, the `top` searched
    # methods by mean final PGD-20 trained again with train.ema = decay, as method "<name>+ema".
    ema: dict | None = None
    # The stability rule: a winner whose final runs collapse (``run_collapsed``) on any seed is set
    # aside with its runs, and the next-best trial of its search trains in its place.
    reject_collapsed: bool = False

    def recorded(self) -> dict[str, Any]:
        """The spec as budget_study.json records it. Keys added after the first studies were recorded
        appear only where set apart from their defaults, so an older record still reads as the same study."""
        tree = asdict(self)
        return {k: v for k, v in tree.items() if k not in LATER_KEYS or v != LATER_KEYS[k]}

    def search_space(self, model: str, budget: float, method: str) -> SearchSpace:
        """The search space of one cell: this method's trials at this budget on this network."""
        return SearchSpace(study=f"{self.study}-{model}-budget{budget:g}-{method}", dataset=self.dataset,
                           recipe=self.recipe, params={**self.common, **(self.methods[method] or {})},
                           fixed={"model": model, "train.method": method, "train.budget": budget, **self.search},
                           metric={"val_robust_acc": 1.0}, mode="max", scheduler={"name": "fifo"},
                           searcher=self.searcher,
                           points_to_evaluate=list((self.points_to_evaluate or {}).get(method) or []),
                           num_samples=self.trials, search_seed=self.search_seed)

    def cells(self):
        """(model, budget, index of the budget) in the order the study runs them: cheap first."""
        return [(model, budget, i) for model in self.models for i, budget in enumerate(self.budgets)]


def load_budget_study(path: str | Path) -> BudgetStudy:
    path = Path(path)
    tree = read_spec(path, "study")
    check_keys(tree, path, SPEC_KEYS,
               ("study", "dataset", "models", "budgets", "methods", "final_seeds", "autoattack_n"))
    spec = BudgetStudy(**tree)
    for key in ("models", "budgets", "final_seeds", "autoattack_n"):
        if not isinstance(getattr(spec, key), list) or not getattr(spec, key):
            raise ConfigError(f"{key}: expected a non-empty list")
    if any(m not in MODELS for m in spec.models):
        raise ConfigError(f"models: each one of {', '.join(MODELS)}; got {spec.models}")
    budgets = spec.budgets
    if not all(isinstance(b, (int, float)) and b > 0 for b in budgets) or budgets != sorted(set(budgets)):
        raise ConfigError(f"budgets: increasing positive numbers of natural-epoch equivalents; got {spec.budgets}")
    for key in ("final_seeds", "autoattack_n"):
        values = getattr(spec, key)
        if len(values) != len(spec.budgets) or not all(isinstance(v, int) and v >= 0 for v in values):
            raise ConfigError(f"{key}: one integer >= 0 per budget ({len(spec.budgets)}); got {values}")
    searched = spec.methods if isinstance(spec.methods, dict) else {}
    if not searched or spec.reference in searched or any(m not in METHODS for m in searched):
        raise ConfigError(f"methods: a mapping of searched methods (not the reference {spec.reference}) to params")
    if spec.reference not in METHODS:
        raise ConfigError(f"reference: one of {', '.join(METHODS)}; got {spec.reference!r}")
    searched_keys = {k for params in [spec.common, *searched.values()] for k in (params or {})}
    overlap = sorted(set(spec.final) & searched_keys)
    if overlap:  # final comes after the winner's knobs: it would replace the winning value
        raise ConfigError(f"final: {overlap[0]} is searched; final may set only what the search does not")
    if not isinstance(spec.trials, int) or spec.trials < 1:
        raise ConfigError(f"trials: an integer >= 1; got {spec.trials!r}")
    if spec.searcher not in SEARCHERS or spec.searcher == "bohb":
        raise ConfigError(f"searcher: random or tpe (bohb stops trials before their budget); got {spec.searcher!r}")
    points = spec.points_to_evaluate or {}
    if not isinstance(points, dict) or any(m not in searched or not isinstance(p, list) for m, p in points.items()):
        raise ConfigError("points_to_evaluate: a mapping of searched method to a list of its fixed first trials")
    if any(len(p) > spec.trials for p in points.values()):
        raise ConfigError(f"points_to_evaluate: at most trials ({spec.trials}) fixed trials per method")
    if not isinstance(spec.reject_collapsed, bool):
        raise ConfigError(f"reject_collapsed: true or false; got {spec.reject_collapsed!r}")
    ema = spec.ema or {"decay": 0.5, "budgets": [], "top": 1}
    if not isinstance(ema, dict) or set(ema) != {"decay", "budgets", "top"} or \
            not isinstance(ema["decay"], float) or not 0 < ema["decay"] < 1 or \
            not isinstance(ema["budgets"], list) or not set(ema["budgets"]) <= set(spec.budgets) or \
            not isinstance(ema["top"], int) or not 1 <= ema["top"] <= len(searched):
        raise ConfigError("ema: {decay: 0 < d < 1, budgets: [some of the study's budgets], top: 1 .. the searched "
                          f"methods}}; got {spec.ema!r}")
    for model, budget, _ in spec.cells():
        for method in spec.methods:
            try:
                check_search_space(spec.search_space(model, budget, method), [])
            except ConfigError as err:
                raise ConfigError(f"methods.{method} ({model}, budget {budget:g}): {err}") from None
        reference = load_config(spec.dataset, spec.recipe, final_overrides(spec, model, budget, spec.reference,
                                                                           knobs=[], seed_index=0))
        if "pgd20" not in reference.eval.attacks:
            raise ConfigError("final: eval.attacks must include pgd20 (the study's tables and plots are in PGD-20)")
    return spec


def final_overrides(spec: BudgetStudy, model: str, budget: float, method: str, *, knobs: list,
                    seed_index: int) -> list[tuple[str, Any]]:
    """A final run's config overrides: the cell, the winner's knobs, ``final``, the recipe's seed + index."""
    base = [("model", model), ("train.method", method), ("train.budget", budget), *knobs, *spec.final.items()]
    return [*base, ("seed", load_config(spec.dataset, spec.recipe, base).seed + seed_index)]


def cell_dir(out: Path, stage: str, *, model: str, budget: float, method: str) -> Path:
    return out / stage / model / f"budget{budget:g}" / method


def search_done(spec: BudgetStudy, sweep_dir: Path) -> bool:
    """Whether a cell's search finished with every trial the spec asks for. A ``done.json`` that
    counts fewer (an interrupted sweep recorded by an older version) does not count as done."""
    done = sweep_dir / "done.json"
    return done.exists() and json.loads(done.read_text() or "{}").get("trials", 0) >= spec.trials


def run_search(spec: BudgetStudy, out: Path, record: Path | None = None) -> None:
    """Every (network, budget, method) sweep not yet done, one after the other."""
    for model, budget, _ in spec.cells():
        for method in spec.methods:
            sweep_dir = cell_dir(out, "search", model=model, budget=budget, method=method)
            if search_done(spec, sweep_dir):
                continue
            space = spec.search_space(model, budget, method)
            sizing = Sizing(overrides=[], workers=1, cpus_per_worker=1.0,
                            validation=validation_resources(space.config()))
            sweep_dir.parent.mkdir(parents=True, exist_ok=True)
            grid = run_sweep(space, sizing, sweep_dir, resume=True)
            rows = results_table(grid, space, sweep_dir.resolve())
            if len(rows) < space.num_samples:  # Tune returns normally on Ctrl-C, with the trials made so far
                raise RuntimeError(f"{sweep_dir}: {len(rows)} of {space.num_samples} trials ran (interrupted?); "
                                   "rerun to resume")
            failed = [r["trial_id"] for r in rows if r["status"] not in ("completed", "diverged")]
            if failed:
                raise RuntimeError(f"{sweep_dir}: trials {', '.join(failed)} did not complete; rerun to retry them")
            write_json_atomic(sweep_dir / "done.json", {"trials": len(rows)}, indent=None)
            save_record(out, record)
            log.info("%s: best %s = %.4f", space.study, OBJECTIVE, rows[0][OBJECTIVE])


def winner(spec: BudgetStudy, out: Path, *, model: str, budget: float, method: str,
           passed_over: tuple[str, ...] = ()) -> dict:
    """The searched cell's best completed trial (a diverged one never wins, whatever it reported
    before), ``passed_over`` trials aside: {trial_id, params, overrides, objective}."""
    trials = [t for t in ranked_trials(spec, out, model=model, budget=budget, method=method)
              if t["trial_id"] not in passed_over]
    if not trials:
        raise ConfigError(f"{cell_dir(out, 'search', model=model, budget=budget, method=method)}: the finals of "
                          f"every completed trial collapsed ({', '.join(passed_over)})")
    return trials[0]


def ranked_trials(spec: BudgetStudy, out: Path, *, model: str, budget: float, method: str) -> list[dict]:
    """The searched cell's completed trials, best first (ties in the search's order), each as
    ``winner`` returns it."""
    import pyarrow.parquet as pq

    sweep_dir = cell_dir(out, "search", model=model, budget=budget, method=method)
    if not search_done(spec, sweep_dir):
        raise ConfigError(f"{sweep_dir}: the search of this cell has not finished (run --stage search)")
    completed = [r for r in pq.read_table(sweep_dir / "results.parquet").to_pylist() if r["status"] == "completed"]
    if not completed:
        raise ConfigError(f"{sweep_dir}: no trial completed (all diverged?); widen or move the search space")
    space, ranked = spec.search_space(model, budget, method), []
    for trial in sorted(completed, key=lambda r: r[OBJECTIVE], reverse=True):  # stable: the first best first
        params = {name: trial[name] for name in space.params}
        overrides = space.trial_overrides(params)[len(space.fixed):]  # the trial's own, after the fixed ones
        ranked.append({"trial_id": trial["trial_id"], "params": params, "overrides": overrides,
                       OBJECTIVE: trial[OBJECTIVE]})
    return ranked


EMA_SUFFIX = "+ema"  # a final run of a method with its weights averaged (the spec's ema)
# final/<model>/budget<B>/collapsed/<method>/<trial_id>/seed<S>: the finals of a winner set aside
# by the stability rule (``reject_collapsed``), kept as evidence, out of the tables
COLLAPSED = "collapsed"


def run_collapsed(run: Path, classes: int) -> bool:
    """Whether a final run diverged (a non-finite loss: its diverged.json) or ended predicting
    about one class: its last validation (held-out training images; the rule never reads the test
    set) at most twice chance."""
    if (run / "diverged.json").exists():
        return True
    return json.loads((run / "summary.json").read_text())["final_epoch"].get("val_clean_acc", 1.0) <= 2 / classes


def set_aside_trials(out: Path, *, model: str, budget: float, method: str) -> tuple[str, ...]:
    """The trials of a cell whose finals collapsed (set aside by ``set_aside_collapsed``)."""
    aside = cell_dir(out, "final", model=model, budget=budget, method=COLLAPSED) / method
    return tuple(sorted(p.name for p in aside.iterdir())) if aside.is_dir() else ()


def trained_with(run: Path, knobs: list) -> bool:
    """Whether a finished final run trained with a trial's knobs (its summary's config has them)."""
    config = json.loads((run / "summary.json").read_text())["config"]
    for key, value in knobs:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            return False
    return True


def _set_aside(root: Path, *, model: str, budget: float, method: str, trial: str) -> None:
    source = cell_dir(root, "final", model=model, budget=budget, method=method)
    target = cell_dir(root, "final", model=model, budget=budget, method=COLLAPSED) / method / trial
    if not source.is_dir():
        return
    if target.exists():  # set aside already: this is a copy (restored from a record) or a move half done
        shutil.rmtree(source)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)


def check_final_runs_are_the_winners(spec: BudgetStudy, out: Path, record: Path | None, *, model: str,
                                     budget: float, method: str, chosen: dict) -> None:
    """Before a cell's finals train: runs of a passed-over trial still in the method's directory
    (here or in the record: a set-aside interrupted half way, or restored from an older record)
    go aside too; a finished run that trained other knobs than the winner's is refused."""
    others = {t["trial_id"]: t["overrides"] for t in ranked_trials(spec, out, model=model, budget=budget, method=method)
              if t["trial_id"] in set_aside_trials(out, model=model, budget=budget, method=method)}
    for root in [out, *([record] if record else [])]:
        runs = [p.parent for p in sorted(cell_dir(root, "final", model=model, budget=budget,
                                                  method=method).glob("seed*/summary.json"))]
        stale = [trial for trial, knobs in others.items() if runs and trained_with(runs[0], knobs)]
        if stale:
            _set_aside(root, model=model, budget=budget, method=method, trial=stale[0])
        elif any(not trained_with(run, chosen["overrides"]) for run in runs):
            raise ConfigError(f"{runs[0].parent}: its runs did not train trial {chosen['trial_id']}'s knobs, the "
                              "winner's; move them away, or rerun from the record")


def set_aside_collapsed(spec: BudgetStudy, out: Path, record: Path | None, *, model: str, budget: float,
                        winners: dict) -> list[str]:
    """The stability rule, after a cell's finals: each searched method whose winner's runs
    collapsed on any seed has them moved (here and in the record) to the cell's ``collapsed``
    directory under the trial's id; returns those methods, whose next-best trials train next."""
    from .data import DATASETS

    classes, methods = DATASETS[spec.dataset].num_classes, []
    for method in spec.methods:
        runs = cell_dir(out, "final", model=model, budget=budget, method=method)
        seeds = sorted(runs.glob("seed*"))
        fell = [run.name for run in seeds if run_collapsed(run, classes)]
        if not fell:
            continue
        trial = winners[winner_key(model, budget, method)]["trial_id"]
        log.warning("%s: trial %s collapsed on %s of %d seeds (diverged, or validation clean accuracy <= %.2f): "
                    "set aside, the next-best trial trains instead", runs, trial, ", ".join(fell), len(seeds),
                    2 / classes)
        for root in [*([record] if record else []), out]:  # the record first: out holds all a rerun needs
            _set_aside(root, model=model, budget=budget, method=method, trial=trial)
        methods.append(method)
    return methods


def final_runs(spec: BudgetStudy, out: Path) -> list[tuple[Path, int]]:
    """Every final run of the study, in order: (its directory, its AutoAttack images). The
    weight-averaged ones (``ema``) are those chosen so far, once the others are trained."""
    runs = []
    for model, budget, i in spec.cells():
        cell = out / "final" / model / f"budget{budget:g}"
        directories = [cell / method for method in [spec.reference, *spec.methods]]
        directories += sorted(cell.glob(f"*{EMA_SUFFIX}"))
        runs += [(d / f"seed{s}", spec.autoattack_n[i]) for d in directories for s in range(spec.final_seeds[i])]
    return runs


def ema_choice(spec: BudgetStudy, out: Path, *, model: str, budget: float) -> list[str]:
    """The ``ema.top`` searched methods by mean final PGD-20 at this cell, best first."""
    means = {}
    for method in spec.methods:
        runs = sorted(cell_dir(out, "final", model=model, budget=budget, method=method).glob("seed*/summary.json"))
        means[method] = statistics.fmean(json.loads(p.read_text())["robust_acc"]["pgd20"] for p in runs)
    return sorted(means, key=means.__getitem__, reverse=True)[:spec.ema["top"]]


def run_final(spec: BudgetStudy, out: Path, record: Path | None = None, *, jobs: int = 1) -> None:
    """Each winner (and the reference) on the whole training set, cell by cell, ``jobs`` runs at
    a time (each on its share of the cores: every run's wall seconds are measured alike), then the
    AutoAttack images of every run: all the training first, so that no evaluation runs while
    wall seconds are being measured."""
    winners = {}  # winner_key -> the chosen trial ({trial_id, params, overrides, objective}; + ema)
    for model, budget, i in spec.cells():
        cell = {"model": model, "budget": budget, "seeds": spec.final_seeds[i]}
        _train_cell_finals(spec, out, record, **cell, winners=winners, jobs=jobs)
        write_json_atomic(out / "winners.json", winners)  # the report reads it
        if spec.ema and budget in spec.ema["budgets"]:
            _train_ema_finals(spec, out, record, **cell, winners=winners, jobs=jobs)
    write_json_atomic(out / "winners.json", winners)
    save_record(out, record)
    run_autoattack(spec, out, record=record)


def winner_key(model: str, budget: float, method: str) -> str:
    """A cell's method in winners.json."""
    return f"{model}/budget{budget:g}/{method}"


def _train_cell_finals(spec: BudgetStudy, out: Path, record: Path | None, *, model: str, budget: float, seeds: int,
                       winners: dict, jobs: int) -> None:
    """The reference and every method's winner at one cell, into ``winners``; under the stability
    rule again, with the next-best trial, for each method whose winner's runs collapsed."""
    methods = [spec.reference, *spec.methods]
    while methods:
        runs = []
        for method in methods:
            chosen = _chosen_trial(spec, out, record, model=model, budget=budget, method=method)
            winners[winner_key(model, budget, method)] = chosen
            runs += _seed_runs(spec, out, model=model, budget=budget, method=method, knobs=chosen["overrides"],
                               seeds=seeds)
        train_finals(spec, runs, out=out, record=record, jobs=jobs)
        methods = set_aside_collapsed(spec, out, record, model=model, budget=budget,
                                      winners=winners) if spec.reject_collapsed else []


def _chosen_trial(spec: BudgetStudy, out: Path, record: Path | None, *, model: str, budget: float,
                  method: str) -> dict:
    """The trial a method's finals train: the best not set aside (the reference: the recipe's)."""
    if method == spec.reference:
        return {"overrides": [], "params": {}}
    chosen = winner(spec, out, model=model, budget=budget, method=method,
                    passed_over=set_aside_trials(out, model=model, budget=budget, method=method))
    if spec.reject_collapsed:
        check_final_runs_are_the_winners(spec, out, record, model=model, budget=budget, method=method, chosen=chosen)
    return chosen


def _train_ema_finals(spec: BudgetStudy, out: Path, record: Path | None, *, model: str, budget: float, seeds: int,
                      winners: dict, jobs: int) -> None:
    """The best methods of a cell again, their weights averaged (``<method>+ema``), into ``winners``."""
    runs = []
    for method in ema_choice(spec, out, model=model, budget=budget):
        chosen = {**winners[winner_key(model, budget, method)], "ema": spec.ema["decay"]}
        winners[winner_key(model, budget, method + EMA_SUFFIX)] = chosen
        runs += _seed_runs(spec, out, model=model, budget=budget, method=method, knobs=chosen["overrides"],
                           seeds=seeds, variant=EMA_SUFFIX, extra=[("train.ema", spec.ema["decay"])])
    train_finals(spec, runs, out=out, record=record, jobs=jobs)


def _seed_runs(spec: BudgetStudy, out: Path, *, model: str, budget: float, method: str, knobs: list, seeds: int,
               variant: str = "", extra: list = ()) -> list[tuple[Path, list]]:
    """One method's final runs at one cell, one a seed: (run directory, config overrides)."""
    runs_dir = cell_dir(out, "final", model=model, budget=budget, method=method + variant)
    return [(runs_dir / f"seed{seed_index}",
             [*final_overrides(spec, model, budget, method, knobs=knobs, seed_index=seed_index), *extra])
            for seed_index in range(seeds)]


def train_finals(spec: BudgetStudy, runs: list[tuple[Path, list]], *, out: Path, record: Path | None,
                  jobs: int) -> None:
    """The final runs not yet finished, ``jobs`` at a time, each in a process of its own with
    cores / jobs torch threads. The first failure (or Ctrl-C) stops the stage; a rerun resumes."""
    # Under the stability rule a run that diverged is an outcome (the setting collapsed), not a failure
    finished = ("summary.json", *(["diverged.json"] if spec.reject_collapsed else []))
    pending = [(run, overrides) for run, overrides in runs if not any((run / f).exists() for f in finished)]
    for _, overrides in pending:
        check_launch(load_config(spec.dataset, spec.recipe, overrides), 1)  # one line, not a traceback
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    recording = threading.Lock()

    def train(run: Path, overrides: list) -> None:
        try:
            _python("atcd_ray.train", spec.dataset, "--workers", "0", "--quiet", "--out", str(run),
                    *(["--recipe", spec.recipe] if spec.recipe else []),
                    *[a for k, v in overrides for a in ("--set", f"{k}={json.dumps(v)}")],
                    env={**os.environ, "OMP_NUM_THREADS": threads})
        except subprocess.CalledProcessError as err:
            if not (spec.reject_collapsed and err.returncode == 3 and (run / "diverged.json").exists()):
                raise
            log.warning("%s diverged: its setting counts as collapsed", run)
        with recording:
            save_record(out, record)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        try:
            for done in [pool.submit(train, run, overrides) for run, overrides in pending]:
                done.result()
        except BaseException:  # the queued runs must not start as the pool closes: the running ones end
            pool.shutdown(wait=False, cancel_futures=True)
            raise


CPU_AUTOATTACK_BATCH = 50  # images a batch (and an actor's task) for AutoAttack on the CPU


def run_autoattack(spec: BudgetStudy, out: Path, *, jobs: int = 1, data_dir: str | None = None,
                   record: Path | None = None) -> None:
    """AutoAttack (and PGD-20, on the same images) on every trained final run that lacks it. On
    the CPU one run at a time, its batches over one single-threaded Ray actor per core in batches
    of 50 (1.27x faster than one actor with every core here, docs/PERFORMANCE.md; a killed study
    resumes by batch), no more actors than batches and none for a single batch (it runs in the
    evaluating process, which then starts no Ray: a tiny study's AutoAttack); on a GPU machine
    ``jobs`` runs at once, each in its own process on the GPU in batches of 500 (AutoAttack's
    small networks leave an H100 mostly idle one at a time).
    Needs neither Ray on a GPU nor the search's results: ``--stage autoattack`` runs this alone."""
    import torch

    gpu = torch.cuda.is_available()
    commands = []
    for run, autoattack_n in final_runs(spec, out):
        aa_json = run / "autoattack.json"
        if autoattack_n and (run / "summary.json").exists() and not aa_json.exists():
            if gpu:
                device = ["--gpu", "--batch-size", "500"]
            else:  # an actor a batch at most; one batch runs in the evaluating process (--workers 0)
                actors = min(len(os.sched_getaffinity(0)), math.ceil(autoattack_n / CPU_AUTOATTACK_BATCH))
                device = ["--workers", str(actors if actors > 1 else 0), "--batch-size", str(CPU_AUTOATTACK_BATCH)]
            summary = json.loads((run / "summary.json").read_text())
            commands.append([str(run / summary["checkpoint"]), "--attacks", "pgd20,autoattack", "--eval-n",
                             str(autoattack_n), "--json", str(aa_json), *device,
                             *(["--data-dir", data_dir] if data_dir else [])])
    if not gpu or jobs == 1:
        for command in commands:  # the first failure (or Ctrl-C) stops the stage; a rerun resumes
            _python("atcd_ray.evaluate", *command)
            save_record(out, record)
        return
    failed = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(_python, "atcd_ray.evaluate", *c): c[c.index("--json") + 1] for c in commands}
        try:
            for done in concurrent.futures.as_completed(futures):
                if done.exception() is not None:
                    failed.append(f"{futures[done]}: {done.exception()}")
                    pool.shutdown(wait=False, cancel_futures=True)  # the running ones finish; no new one starts
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    save_record(out, record)
    if failed:
        raise RuntimeError("AutoAttack failed for " + "; ".join(failed) + " (rerun to retry)")


# What a record keeps (--record): all the report and a resumed study read, and no trial's files.
# A set-aside winner's runs keep what was recorded of them (summary and weights, or diverged.json);
# a final that diverged is kept before its cell ends too, so that a study resumed on a fresh
# machine does not train it again.
STUDY_FILES = ("budget_study.json", "winners.json", "search/*/*/*/done.json", "search/*/*/*/results.parquet",
               "final/*/*/*/seed*/diverged.json",
               f"final/*/*/{COLLAPSED}/*/*/seed*/summary.json", f"final/*/*/{COLLAPSED}/*/*/seed*/diverged.json")
RUN_FILES = ("summary.json", "weights.safetensors", "autoattack.json")  # of each final run, recorded


def save_record(out: Path, record: Path | None) -> None:
    """Copy into ``record`` what it lacks or holds older: final runs as their summary and a
    weights-only copy of the checkpoint it names (``recorded_from``: that checkpoint), which the
    summary then names, so that the record's runs evaluate as they are."""
    if record is None:
        return
    for summary_path in sorted(out.glob("final/*/*/*/seed*/summary.json")):
        kept = record / summary_path.relative_to(out)
        summary = json.loads(summary_path.read_text())
        if kept.exists() or summary["checkpoint"] == "weights.safetensors":  # recorded, or restored from one
            continue
        kept.parent.mkdir(parents=True, exist_ok=True)
        save_weights_only(summary_path.parent / summary["checkpoint"], kept.parent / "weights.safetensors")
        write_json_atomic(kept, {**summary, "checkpoint": "weights.safetensors",
                                 "recorded_from": summary["checkpoint"]})
    for pattern in (*STUDY_FILES, "final/*/*/*/seed*/autoattack.json"):
        for path in sorted(out.glob(pattern)):
            kept = record / path.relative_to(out)
            # a set-aside run's summary is the record's own once there (it names the record's weights)
            set_aside = COLLAPSED in path.relative_to(out).parts
            if not kept.exists() or (not set_aside and kept.read_bytes() != path.read_bytes()):
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, kept)


def restore_record(record: Path, out: Path) -> int:
    """Copy into ``out`` what ``record`` has and ``out`` lacks; the number of files copied. A final
    run comes back whole or not at all: one that ``out`` holds (trained here, or half trained and
    resuming) is left as it is."""
    copies = [(path, out / path.relative_to(record))
              for pattern in STUDY_FILES for path in sorted(record.glob(pattern))]
    for run in sorted(record.glob("final/*/*/*/seed*")):
        target = out / run.relative_to(record)
        summary = target / "summary.json"
        if not target.exists() or (summary.exists() and summary.read_bytes() == (run / "summary.json").read_bytes()):
            copies += [(run / name, target / name) for name in RUN_FILES if (run / name).exists()]
    copied = 0
    for path, target in copies:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied += 1
    return copied


def _python(module: str, *args: str, env: dict | None = None) -> None:
    log.info("python -m %s %s", module, " ".join(args))
    subprocess.run([sys.executable, "-m", module, *args], check=True, env=env)
