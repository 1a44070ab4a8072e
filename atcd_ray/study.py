"""``python -m atcd_ray.study SPEC.yaml``: robustness per unit of compute, every method tuned alike.

    python -m atcd_ray.study tune_spaces/fashion-mnist_fair.yaml                  # search, then final
    python -m atcd_ray.study tune_spaces/fashion-mnist_fair.yaml --stage search   # the search only
    python -m atcd_ray.report runs/fashion-mnist-fair                             # tables and plots

A budget is compute in natural-epoch equivalents: forward+backward passes over the training set
(``train.budget``; each method's passes per minibatch are ``Method.passes``). For each network
and each budget, every searched method gets the same number of Ray Tune trials over its own
knobs (and the knobs every method shares), each trial spending the budget on the search subset;
the trial with the best validation robust accuracy wins, the test split plays no part (with
``reject_collapsed``, a winner whose final runs collapse gives way to the next-best trial). Natural
training is the one-run reference, at the recipe's settings. The winners are trained again on
the whole training set, ``final_seeds`` seeds per budget, ``--jobs`` runs at a time (default 1,
so that their wall seconds compare), and tested on the whole test set; then every run gets AutoAttack
on the first ``autoattack_n`` test images (``--stage autoattack`` alone: on a GPU machine, where
neither Ray nor the search's results need be). Everything resumes: a finished sweep, run or evaluation is not
redone, an interrupted one continues (rerun the same command).

``--record DIR`` keeps the study's outcome where a rerun on another machine finds it (the project
keeps results/fashion-mnist-fair and the superseded results/fashion-mnist-budget in git, since a
session's machine keeps nothing): each finished
sweep's results table, each final run's summary and a weights-only copy of its checkpoint, each
AutoAttack result. A rerun first copies into ``--out`` what the record has and ``--out`` lacks, so
a study resumes from the record alone, and ``python -m atcd_ray.report DIR`` reads it as a study.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .budget import load_budget_study, restore_record, run_autoattack, run_final, run_search, save_record
from .cli import ArgumentParser, run_main, setup_logging
from .config import ConfigError
from .core.checkpoint import write_json_atomic
from .sweep import check_not_uri

log = logging.getLogger("atcd_ray.study")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.study", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="budget study YAML (tune_spaces/fashion-mnist_fair.yaml)")
    p.add_argument("--stage", choices=["search", "final", "all", "autoattack"], default="all",
                   help="autoattack: only the AutoAttack of the final runs trained so far (no Ray on a GPU machine)")
    p.add_argument("--out", help="study directory (default: runs/<study>)")
    p.add_argument("--record", help="a directory that keeps the study's outcome across machines (results/STUDY in "
                                     "git): read first, then written as the study goes")
    p.add_argument("--jobs", type=int, default=1, help="--stage final: runs trained at once, each on cores / jobs "
                                                         "threads; --stage autoattack on a GPU: runs evaluated at once")
    p.add_argument("--data-dir", help="--stage autoattack: the test data's directory (default: the checkpoints')")
    return p


# What a study may change once it has begun: how many final seeds, AutoAttack's images, the
# weight-averaged finals. Not the search, the finals' overrides or anything else the runs used.
FINAL_STAGE_KEYS = ("final_seeds", "autoattack_n", "ema", "reject_collapsed")


def check_same_study(recorded: Path, spec, refusal: str) -> None:
    """A study's directory (or record) goes on only under its own spec, final-stage keys aside."""
    if not recorded.exists():
        return
    old, new = json.loads(recorded.read_text()), spec.recorded()
    begun = lambda tree: {k: v for k, v in tree.items() if k not in FINAL_STAGE_KEYS}  # noqa: E731
    if begun(old) != begun(new):
        raise ConfigError(refusal)
    if old != new:
        log.info("%s: %s changed", recorded, ", ".join(k for k in FINAL_STAGE_KEYS if old.get(k) != new.get(k)))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stage not in ("autoattack", "final") and args.jobs != 1 or args.stage != "autoattack" and args.data_dir:
        raise ConfigError("--jobs belongs to --stage final and autoattack, --data-dir to --stage autoattack")
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    spec = load_budget_study(args.spec)
    check_not_uri(args.out)
    out = Path(args.out or f"runs/{spec.study}").resolve()
    setup_logging()
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "budget_study.json"
    check_same_study(recorded, spec, f"{out} holds a study with another spec; give another --out")
    record = Path(args.record).resolve() if args.record else None
    if record:
        check_same_study(record / "budget_study.json", spec,
                         f"{record} records a study with another spec; give another --record")
    write_json_atomic(recorded, spec.recorded())
    if record:
        log.info("%d files restored from %s", restore_record(record, out), record)
        save_record(out, record)
    if args.stage in ("search", "all"):
        run_search(spec, out, record)
    if args.stage in ("final", "all"):
        run_final(spec, out, record, jobs=args.jobs)
    if args.stage == "autoattack":
        run_autoattack(spec, out, jobs=args.jobs, data_dir=args.data_dir, record=record)
    print(f"study: {out}; python -m atcd_ray.report {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

