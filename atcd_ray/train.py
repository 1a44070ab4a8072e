"""``python -m atcd_ray.train DATASET``: train one method and evaluate it on the test set.

    python -m atcd_ray.train fashion-mnist --method atcd --epochs 5 --out runs/atcd
    python -m atcd_ray.train cifar10 --recipe pipelines/cifar10_wrn34-10.yaml --set methods.atcd.T=4

Writes DIR/summary.json (clean and robust accuracy, training seconds, the checkpoint),
DIR/metrics.jsonl (one line per epoch) and TensorBoard events in DIR/tb/.

``--workers N`` (default 1) trains through Ray Train with N workers (DDP from 2), joining the
cluster of RAY_ADDRESS or starting a local Ray; ``--workers MIN-MAX`` is an elastic group that
Ray grows and shrinks as nodes come and go; ``--workers 0`` trains in this process.
Rerunning a command with the same --out resumes its run. ``--out s3://BUCKET/PATH`` keeps the run
on object storage: Ray's checkpoints go there, and the run's files are written in a local scratch
directory and copied there as they are written (``storage.RunUpload``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from .cli import ArgumentParser, check_launch, markdown_table, run_main, setup_logging, worker_range
from .config import ConfigError, load_config, parse_override
from .core.methods import METHODS
from .data import DATASETS
from .storage import RunUpload, download_run, is_uri, local_copy


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--method", help=f"one of: {', '.join(METHODS)} (default: the recipe's)")
    p.add_argument("--recipe", help="YAML recipe (default: the dataset's, e.g. "
                                    "pipelines/fashion-mnist_compactcnn.yaml; docs/TRAINING.md, Recipes)")
    p.add_argument("--eps", type=float, help="L-inf radius for inputs in [0, 1]")
    p.add_argument("--epochs", type=int,
                   help="epochs, sweeps over the training data (replaces the recipe's train.budget)")
    p.add_argument("--budget", type=float, help="compute in natural-epoch equivalents (forward+backward passes over "
                                                "the training set): budget / the method's passes a minibatch epochs, "
                                                "the last one a fraction where they do not divide it")
    p.add_argument("--subset", type=int, help="train on the first N training examples")
    p.add_argument("--eval-n", type=int, help="evaluate on the first N test examples")
    p.add_argument("--workers", type=worker_range, default=(1, 1), metavar="N|MIN-MAX",
                   help="Ray Train workers (DDP from 2); MIN-MAX: an elastic group that Ray grows and shrinks "
                        "with the cluster; 0: train in this process without Ray (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs reserved per Ray Train worker (default: the cluster's CPUs split evenly over the workers)")
    p.add_argument("--max-failures", type=int, default=3, help="restarts of the worker group after a failure")
    p.add_argument("--data-dir", help="where the dataset lives")
    p.add_argument("--out", help="run directory (default: runs/<dataset>-<method>), or a URI: s3://BUCKET/PATH")
    p.add_argument("--seed", type=int, help="seeds the weights, the data order and every draw (default: the "
                                           "recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set methods.atcd.T=2, train.ema=0.999, "
                        "train.select_best=robust_val, train.val_async=true, train.val_every=5, "
                        "train.checkpoint_steps=200, train.amp=true (repeatable; the keys: atcd_ray/config.py "
                        "and docs/TRAINING.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines during an epoch")
    return p


def overrides_from(args: argparse.Namespace) -> list[tuple[str, object]]:
    if args.epochs is not None and args.budget is not None:
        raise ConfigError("--epochs or --budget, not both: a budget sets the epochs")
    flags = {"train.method": args.method, "eps": args.eps, "train.epochs": args.epochs, "train.budget": args.budget,
             "data.subset": args.subset, "eval.n": args.eval_n, "data.dir": args.data_dir, "seed": args.seed}
    return [(k, v) for k, v in flags.items() if v is not None] + [parse_override(s) for s in args.set]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dataset not in DATASETS:
        raise ConfigError(f"dataset: unknown dataset {args.dataset!r}; allowed: {', '.join(DATASETS)}")
    if (args.cpus_per_worker or 1) <= 0 or args.max_failures < 0:
        raise ConfigError("--max-failures must be >= 0, --cpus-per-worker > 0")
    ray_workers = args.workers[1] > 0
    if args.gpu and not ray_workers:
        raise ConfigError("--gpu reserves GPUs for Ray Train workers: give --workers N >= 1 "
                          "(with --workers 0 a visible GPU is used anyway)")
    cfg = load_config(args.dataset, args.recipe, overrides_from(args))
    check_launch(cfg, max(args.workers[1], 1))
    uri = args.out if is_uri(args.out) else None
    with tempfile.TemporaryDirectory(prefix="atcd-run-") if uri else contextlib.nullcontext() as copy:
        # A run on object storage is checked, and trained in-process, in a local copy of its files.
        out = download_run(uri, Path(copy)) if uri else Path(args.out or f"runs/{cfg.dataset}-{cfg.train.method}")
        from .run_dir import check_launcher, check_resumable

        check_resumable(out, cfg)
        check_launcher(out, "ray" if ray_workers else "in-process")  # the first file of a new run
        publish = RunUpload(out, uri) if uri else None
        if publish:
            publish()
        setup_logging()
        if ray_workers:
            from .distributed import fit_distributed
            from .run_dir import read_summary

            fit_distributed(cfg, uri or out, workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                            max_failures=args.max_failures,
                            progress=not args.quiet)
            if uri:  # the summary only: the rest of the run stays in the bucket
                local_copy(f"{uri}/summary.json", out)
            summary = read_summary(out)
        else:
            from .trainer import fit  # torch-heavy imports only once the config is known to be good

            summary = fit(cfg, out, progress=not args.quiet, publish=publish)
    robust = summary["robust_acc"]  # in the order of eval.attacks (summary.json sorts its keys)
    row = {"method": summary["method"], "clean": summary["clean_acc"], **{a: robust[a] for a in cfg.eval.attacks},
           "train s": f"{summary['train_seconds']:.0f}"}
    print(markdown_table([row], list(row)))
    print(f"summary: {uri + '/summary.json' if uri else out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
