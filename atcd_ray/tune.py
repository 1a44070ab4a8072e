"""``python -m atcd_ray.tune SPACE.yaml``: a Ray Tune sweep, one Ray Train run per trial.

    python -m atcd_ray.tune tune_spaces/fashion-mnist_lambda-rho.yaml --epochs 3 --subset 10000
    python -m atcd_ray.tune tune_spaces/fashion-mnist_lambda-rho.yaml --resume   # after an interruption

A space YAML names a dataset (and optionally a recipe), ``fixed`` overrides for every trial, the
searched ``params`` and how to score and schedule trials (tune_spaces/README.md has the format).
Each trial is a Tune function that launches one TorchTrainer (the Train V2 pattern) whose
epoch reports reach Tune through ``TuneReportCallback``; its run directory
(DIR/runs/<trial id>/: metrics.jsonl, summary.json, checkpoints, tb/) is a full training run.
ASHA stops weak trials after ``grace_period`` epochs. The ``searcher`` draws the trials: random
(Tune's variant generator, grids too), tpe (Optuna's TPE) or bohb (TuneBOHB with HyperBandForBOHB);
``points_to_evaluate`` are its fixed first trials (a method's published setting). Its seed is
drawn when the space gives none, and DIR/searcher.json records searcher, seed and points; a
resumed sweep restores the searcher's state from the experiment directory, so the search goes
on. At the end DIR/results.csv and DIR/results.parquet hold one row per trial (with the
searcher and its seed); ``tensorboard --logdir DIR`` shows every trial.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import ArgumentParser, check_launch, markdown_table, run_main, setup_logging, worker_range
from .config import ConfigError, parse_override
from .search_space import load_search_space
from .sweep import (OBJECTIVE, SEARCHER_JSON, Sizing, check_not_uri, read_searcher, results_table,
                    run_sweep, validation_resources)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="search space YAML (tune_spaces/)")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max_t)")
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
    space = load_search_space(args.space, overrides)
    check_launch(space.config(overrides), args.workers[1])  # before any trial starts
    check_not_uri(args.out)
    out = Path(args.out or f"runs/sweeps/{space.study}")
    setup_logging()
    sizing = Sizing(overrides, workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                    max_failures=args.max_failures, validation=validation_resources(space.config(overrides)))
    grid = run_sweep(space, sizing, out, num_samples=args.num_samples, resume=args.resume,
                     max_concurrent=args.max_concurrent)
    rows = results_table(grid, space, out.resolve())
    shown = ["trial_id", *space.params, "status", "epochs", OBJECTIVE, "val_clean_acc", "val_robust_acc",
             *[c for c in rows[0] if c.startswith("test_")]] if rows else []
    print(markdown_table([{**r, **{p: str(r[p]) for p in space.params}} for r in rows], shown))
    searcher = read_searcher(out) or {}
    print(f"searcher: {searcher.get('searcher')}, seed {searcher.get('search_seed')} ({out / SEARCHER_JSON})")
    print(f"results: {out / 'results.csv'} and results.parquet; tensorboard --logdir {out}")
    errors = [r["trial_id"] for r in rows if r["status"] == "error"]
    if errors:
        print(f"error: {len(errors)} trial(s) failed: {', '.join(errors)}; --resume retries them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
