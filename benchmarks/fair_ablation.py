"""What ATCD's clean accuracy depends on at the fair study's budget 48 (issue 26's "why"): ATCD's
winning setting with one knob changed, trained exactly as the study's finals are (its spec's
final overrides, seeds 0-4, all 55,000 training images, whole test set), and paired by seed with
the study's own ATCD and PGD-AT finals. Not part of the study's comparison: no other method got
an extra trial, so a variant that does better is a lead for ATCD's search, not a win.

    python benchmarks/fair_ablation.py train [--jobs 2] [--only VARIANT ...]   # resumable
    python benchmarks/fair_ablation.py search [--jobs 2]                       # as one search trial each
    python benchmarks/fair_ablation.py table                                   # markdown

Runs go to runs/fair-ablation/VARIANT/seedS (checkpoints and TensorBoard events); each finished
run's summary.json, metrics.jsonl and a weights-only copy of its checkpoint are kept in
results/fashion-mnist-fair-ablation/, which ``table`` reads beside the study's record,
results/fashion-mnist-fair.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atcd_ray.budget import collapsed, final_overrides, load_budget_study, train_finals  # noqa: E402
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


def by_seed(directory: Path) -> dict[int, dict]:
    """Seed -> summary of the runs that trained; a diverged or collapsed run (the study's stability
    rule) stops the table, since its mean would not be one setting's accuracy."""
    fell = [run.name for run in sorted(directory.glob("seed*")) if collapsed(run, CLASSES)]
    if fell:
        raise SystemExit(f"{directory}: {', '.join(fell)} collapsed or diverged (the study's stability rule)")
    return {s["seed"]: s for s in (json.loads(p.read_text()) for p in sorted(directory.glob("seed*/summary.json")))}


def _cell(values: list[float]) -> str:
    mean, half = mean_interval([100 * v for v in values])
    return f"{mean:+.2f} ± {half:.2f}" if half is not None else ""


def table() -> str:
    cell = STUDY_RECORD / "final" / MODEL / f"budget{BUDGET}"
    references = {"atcd": by_seed(cell / "atcd"), "pgd": by_seed(cell / "pgd")}
    lines = ["| run | seeds | passes | epochs | clean % | PGD-20 % | minus ATCD: clean | PGD-20 | minus PGD-AT: clean "
             "| PGD-20 | commits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"atcd": "the study's ATCD", "pgd": "the study's PGD-AT"}
    for name, runs in [*((names[k], v) for k, v in references.items()),
                       *((name, by_seed(RECORD / name)) for name in VARIANTS)]:
        if not runs:
            continue
        first = next(iter(runs.values()))
        clean = [s["clean_acc"] for s in runs.values()]
        robust = [s["robust_acc"]["pgd20"] for s in runs.values()]
        paired = []
        for ref in references.values():
            if ref is runs:
                paired += ["", ""]
                continue
            seeds = sorted(set(runs) & set(ref))
            paired += [_cell([runs[s]["clean_acc"] - ref[s]["clean_acc"] for s in seeds]),
                       _cell([runs[s]["robust_acc"]["pgd20"] - ref[s]["robust_acc"]["pgd20"] for s in seeds])]
        commits = sorted({(s["provenance"].get("commit") or "?")[:7] for s in runs.values()})
        lines.append(f"| {name} | {len(runs)} | {first['passes_per_minibatch']} | {first['epochs']} | "
                     f"{_cell(clean).lstrip('+')} | {_cell(robust).lstrip('+')} | {' | '.join(paired)} | "
                     f"{', '.join(commits)} |")
    return "\n".join(lines) + "\n\n± is the half-width of the 95% t interval over seeds; paired differences by seed."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train")
    run.add_argument("--only", nargs="+", choices=list(VARIANTS))
    run.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores / jobs torch threads")
    trial = sub.add_parser("search")
    trial.add_argument("--only", nargs="+", choices=list(VARIANTS))
    trial.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores / jobs torch threads")
    sub.add_parser("table")
    args = parser.parse_args()
    os.chdir(ROOT)  # the spec's recipe path is relative to the repository
    if args.command in ("train", "search"):
        {"train": train, "search": search}[args.command](args.only, args.jobs)
    else:
        print(table())


if __name__ == "__main__":
    main()
