"""What ATCD's clean accuracy depends on at the fair study's budget 48 (issue 26's "why"): ATCD's
winning setting with one knob changed, trained exactly as the study's finals are (its spec's
final overrides, seeds 0-4, all 55,000 training images, whole test set), and paired by seed with
the study's own ATCD and PGD-AT finals. Not part of the study's comparison: no other method got
an extra trial, so a variant that does better is a lead for ATCD's search, not a win.

    python benchmarks/fair_ablation.py train [--jobs 2] [--only VARIANT ...]   # resumable
    python benchmarks/fair_ablation.py search [--jobs 2]                       # as one search trial each
    python benchmarks/fair_ablation.py autoattack                              # as the study's finals at 48
    python benchmarks/fair_ablation.py table                                   # markdown

Runs go to runs/fair-ablation/VARIANT/seedS (checkpoints and TensorBoard events); each finished
run's summary.json, metrics.jsonl and a weights-only copy of its checkpoint are kept in
results/fashion-mnist-fair-ablation/, which ``table`` reads beside the study's record,
results/fashion-mnist-fair.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atcd_ray.budget import (CPU_AUTOATTACK_BATCH, final_overrides, load_budget_study, run_collapsed,  # noqa: E402
                             train_finals)
from atcd_ray.core.checkpoint import save_weights_only  # noqa: E402
from atcd_ray.report import mean_interval  # noqa: E402

SPEC = ROOT / "tune_spaces" / "fashion-mnist_fair.yaml"
STUDY_RECORD = ROOT / "results" / "fashion-mnist-fair"
RUNS = ROOT / "runs" / "fair-ablation"
RECORD = ROOT / "results" / "fashion-mnist-fair-ablation"
MODEL, BUDGET = "compactcnn", 48
WINNER = "b291e4ec"  # ATCD's winner at 48: T 4, K 2 with reuse_grad, 8 passes a minibatch (6 epochs)
# Each variant: what it changes in the winner. ATCD replays each minibatch T times, as Free does,
# and Free (8 replays) is, bar TRADES, the least accurate on clean images of the study's methods
# at 48; T 2 halves the replays and doubles the epochs (12) at the same passes. The study's ATCD
# searches never drew T 2 with K 2 (their results.parquet, column "T, K").
VARIANTS = {"T=2": [("methods.atcd.T", 2)]}
CLASSES = 10


def winner_knobs(spec) -> list:
    winner = json.loads((STUDY_RECORD / "winners.json").read_text())[f"{MODEL}/budget{BUDGET}/atcd"]
    if winner["trial_id"] != WINNER:
        raise SystemExit(f"the study's ATCD winner at {BUDGET} is {winner['trial_id']}, not {WINNER}: "
                         "check VARIANTS against it before training")
    return winner["overrides"]


def train(only: list[str] | None, jobs: int) -> None:
    """Each variant as the study's finals train (seeds 0-4, all 55,000 images)."""
    spec = load_budget_study(SPEC)
    seeds = spec.final_seeds[spec.budgets.index(BUDGET)]
    runs = [(RUNS / name / f"seed{i}", [*final_overrides(spec, MODEL, BUDGET, "atcd", knobs=winner_knobs(spec),
                                                         seed_index=i), *VARIANTS[name]])
            for name in only or VARIANTS for i in range(seeds)]
    _train_and_keep(spec, runs, jobs)


def search(only: list[str] | None, jobs: int) -> None:
    """Each variant, and the winner as a control, as one trial of the study's search (the first
    10,000 training images, validated once, PGD-10 on 2,000 held-out images, the recipe's seed):
    would the search have chosen the variant over its winner had it drawn it?"""
    spec = load_budget_study(SPEC)
    cell = [("model", MODEL), ("train.method", "atcd"), ("train.budget", BUDGET), *spec.search.items()]
    runs = [(RUNS / "search" / name, [*cell, *winner_knobs(spec), *([] if name == "winner" else VARIANTS[name])])
            for name in ["winner", *(only or VARIANTS)]]
    _train_and_keep(spec, runs, jobs)
    recorded = next(t for t in pq.read_table(STUDY_RECORD / "search" / MODEL / f"budget{BUDGET}" / "atcd" /
                                             "results.parquet").to_pylist() if t["trial_id"] == WINNER)
    print(f"the search's own trial {WINNER}: validation PGD-10 {100 * recorded['val_robust_acc']:.2f}%, "
          f"clean {100 * recorded['val_clean_acc']:.2f}%")
    for run, _ in runs:
        final = json.loads((run / "summary.json").read_text())["final_epoch"]
        print(f"{run.name}: validation PGD-10 {100 * final['val_robust_acc']:.2f}%, "
              f"clean {100 * final['val_clean_acc']:.2f}%")


def _train_and_keep(spec, runs: list, jobs: int) -> None:
    train_finals(spec, runs, out=RUNS, record=None, jobs=jobs)  # a diverged run counts as finished
    for run, _ in runs:  # what the table reads, kept in git
        kept = RECORD / run.relative_to(RUNS)
        kept.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "metrics.jsonl", "diverged.json"):
            if (run / name).exists():
                shutil.copyfile(run / name, kept / name)
        if (run / "summary.json").exists():  # the weights too, as the study's record keeps its finals'
            checkpoint = json.loads((run / "summary.json").read_text())["checkpoint"]
            save_weights_only(run / checkpoint, kept / "weights.safetensors")


def autoattack(only: list[str] | None) -> None:
    """AutoAttack (standard) and PGD-20 on the first test images of each variant's runs, as the
    study evaluates its budget-48 finals (its ``autoattack_n`` images, 50-image batches over one
    single-threaded Ray actor per core); each result kept beside the run's summary. Resumable."""
    spec = load_budget_study(SPEC)
    n = spec.autoattack_n[spec.budgets.index(BUDGET)]
    actors = min(len(os.sched_getaffinity(0)), math.ceil(n / CPU_AUTOATTACK_BATCH))
    for name in only or VARIANTS:
        for weights in sorted((RECORD / name).glob("seed*/weights.safetensors")):
            kept = weights.parent / "autoattack.json"
            if kept.exists():
                continue
            result = RUNS / weights.parent.relative_to(RECORD) / "autoattack.json"  # its batches beside it
            result.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "atcd_ray.evaluate", str(weights), "--attacks", "pgd20,autoattack",
                            "--eval-n", str(n), "--json", str(result), "--workers", str(actors),
                            "--batch-size", str(CPU_AUTOATTACK_BATCH)], check=True)
            shutil.copyfile(result, kept)


def by_seed(directory: Path) -> dict[int, dict]:
    """Seed -> accuracies of the runs that trained (clean, PGD-20, and AutoAttack where it ran); a
    diverged or collapsed run (the study's stability rule) stops the table, since its mean would
    not be one setting's accuracy."""
    fell = [run.name for run in sorted(directory.glob("seed*")) if run_collapsed(run, CLASSES)]
    if fell:
        raise SystemExit(f"{directory}: {', '.join(fell)} collapsed or diverged (the study's stability rule)")
    runs = {}
    for path in sorted(directory.glob("seed*/summary.json")):
        summary = json.loads(path.read_text())
        attacked = path.parent / "autoattack.json"
        runs[summary["seed"]] = {"clean": summary["clean_acc"], "PGD-20": summary["robust_acc"]["pgd20"],
                                 "AutoAttack": json.loads(attacked.read_text())["robust_acc"]["autoattack"]
                                 if attacked.exists() else None, "summary": summary}
    return runs


METRICS = ("clean", "PGD-20", "AutoAttack")


def _cell(values: list[float], *, signed: bool) -> str:
    mean, half = mean_interval([100 * v for v in values])
    return f"{mean:{'+' if signed else ''}.2f} ± {half:.2f}" if half is not None else ""


def table() -> str:
    cell = STUDY_RECORD / "final" / MODEL / f"budget{BUDGET}"
    references = {"ATCD": by_seed(cell / "atcd"), "PGD-AT": by_seed(cell / "pgd")}
    columns = ["run", "seeds", "passes", "epochs", *(f"{m} %" for m in METRICS),
               *(f"minus {r}: {m}" for r in references for m in METRICS), "commits"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, runs in [*((f"the study's {k}", v) for k, v in references.items()),
                       *((name, by_seed(RECORD / name)) for name in VARIANTS)]:
        if not runs:
            continue
        summary = next(iter(runs.values()))["summary"]
        row = [name, str(len(runs)), str(summary["passes_per_minibatch"]), str(summary["epochs"])]
        row += [_cell([r[m] for r in runs.values() if r[m] is not None], signed=False) for m in METRICS]
        for ref in references.values():
            both = [s for s in sorted(set(runs) & set(ref)) if ref is not runs]
            row += [_cell([runs[s][m] - ref[s][m] for s in both if runs[s][m] is not None and ref[s][m] is not None],
                          signed=True) for m in METRICS]
        row.append(", ".join(sorted({(r["summary"]["provenance"].get("commit") or "?")[:7] for r in runs.values()})))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + ("\n\n± is the half-width of the 95% t interval over seeds; paired differences by "
                               "seed; AutoAttack on the first 1,000 test images, where it has run.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train")
    run.add_argument("--only", nargs="+", choices=list(VARIANTS))
    run.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores / jobs torch threads")
    trial = sub.add_parser("search")
    trial.add_argument("--only", nargs="+", choices=list(VARIANTS))
    trial.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores / jobs torch threads")
    attack = sub.add_parser("autoattack")
    attack.add_argument("--only", nargs="+", choices=list(VARIANTS))
    sub.add_parser("table")
    args = parser.parse_args()
    os.chdir(ROOT)  # the spec's recipe path is relative to the repository
    if args.command in ("train", "search"):
        {"train": train, "search": search}[args.command](args.only, args.jobs)
    elif args.command == "autoattack":
        autoattack(args.only)
    else:
        print(table())


if __name__ == "__main__":
    main()
