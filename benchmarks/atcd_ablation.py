"""ATCD's open readings, each switched alone from the paper's setting (issue 25; the table is in
docs/ALGORITHM_NOTES.md, "The readings, by ablation").

    python benchmarks/atcd_ablation.py train [--seeds 0 1 2] [--only VARIANT ...]   # resumable
    python benchmarks/atcd_ablation.py input-ce --model results/.../weights.safetensors
    python benchmarks/atcd_ablation.py table                                       # markdown

``train``: every variant below on Fashion-MNIST, CompactCNN, eps 0.1, 24 natural-epoch
equivalents of compute on all 55,000 training images (the recipe's learning rate schedule over
them: Free-4's tuned lr 0.0635, cosine, for every row, since T = 4 replays a minibatch as Free-4
does), in this process (``--workers 0``), one run at a time, seeds outermost so that a stopped
sweep has every variant at the seeds it finished; whole test set, clean and PGD-20. A run whose
summary.json exists is skipped, so rerunning the command resumes the sweep. Runs go to
results/atcd-ablation/VARIANT/seedS.

``input-ce``: how adversarial each variant's training inputs are. One trained model, frozen (SGD
with lr 0: the method's steps run, the weights never move), each variant's step on the same
--batches training minibatches; the mean cross-entropy of the inputs each update trains on, over
the second half (the carried chains have warmed up by then). Free-4, Fast-FGSM, N-FGSM and PGD-3
beside them as references. Writes results/atcd-ablation/input_ce.json.

``table``: mean and 95% t-interval over seeds of clean and PGD-20 accuracy, and each variant's
paired difference to the paper's setting (same seeds), with the input cross-entropy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "atcd-ablation"
RECIPE = "pipelines/fashion-mnist_compactcnn.yaml"
BUDGET = 24
# The paper's setting (its Section 6 and Table 5's best cell): T 4, K 2, lambda 2, rho 1,
# alpha = eta = eps (null), tau = kappa = 1; and the project's readings before issue 25.
PAPER = {"methods.atcd.T": 4, "methods.atcd.K": 2, "methods.atcd.lam": 2.0, "methods.atcd.rho": 1.0,
         "methods.atcd.alpha": None, "methods.atcd.eta": None, "methods.atcd.tau": 1.0, "methods.atcd.kappa": 1.0,
         "methods.atcd.init": "carry", "methods.atcd.kick": "sign", "methods.atcd.order": "kick_drift",
         "methods.atcd.reuse_grad": False, "methods.atcd.mh_start": "evaluate"}
COMMON = {"train.budget": BUDGET, "optim.lr": 0.06353309749933138, "optim.schedule": "cosine",
          "eval.attacks": ["pgd20"], "train.select_best": "last"}
VARIANTS = {
    "paper": {},
    "init=uniform": {"methods.atcd.init": "uniform"},
    "init=carry_delta": {"methods.atcd.init": "carry_delta"},
    "kick=gradient": {"methods.atcd.kick": "gradient"},
    "order=drift_kick": {"methods.atcd.order": "drift_kick"},
    "reuse_grad": {"methods.atcd.reuse_grad": True},  # H_old by the current weights (the fix)
    "reuse_grad,mh_start=reuse": {"methods.atcd.reuse_grad": True, "methods.atcd.mh_start": "reuse"},
}
# The best combination of the single switches, filled in once they are measured (see the table).
COMBINED: dict[str, dict] = {}
REFERENCES = {"free-4": {"train.method": "free", "methods.free.replays": 4}}


def overrides(variant: str) -> dict:
    if variant in REFERENCES:
        return {**COMMON, **REFERENCES[variant]}
    return {**COMMON, "train.method": "atcd", **PAPER, **{**VARIANTS, **COMBINED}[variant]}


def train(seeds: list[int], only: list[str] | None) -> None:
    names = only or [*VARIANTS, *COMBINED, *REFERENCES]
    for seed in seeds:
        for name in names:
            out = OUT / name / f"seed{seed}"
            if (out / "summary.json").exists():
                continue
            sets = [arg for key, value in overrides(name).items() for arg in ("--set", f"{key}={json.dumps(value)}")]
            command = [sys.executable, "-m", "atcd_ray.train", "fashion-mnist", "--recipe", RECIPE, "--workers", "0",
                       "--seed", str(seed), "--quiet", "--out", str(out), *sets]
            print(" ".join(command), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)


def input_ce(model_path: Path, batches: int) -> None:
    sys.path.insert(0, str(ROOT))
    from atcd_ray import load_model
    from atcd_ray.config import load_config
    from atcd_ray.core.methods import METHODS
    from atcd_ray.factories import build_splits_of

    references = {"free-4": {"train.method": "free", "methods.free.replays": 4},
                  "fast": {"train.method": "fast", "methods.fast.alpha_factor": 1.25},
                  "nfgsm": {"train.method": "nfgsm"},
                  "pgd-3": {"train.method": "pgd", "methods.pgd.steps": 3, "methods.pgd.alpha": 0.025}}
    rows = {}
    for name in [*VARIANTS, *COMBINED, *references]:
        sets = {**COMMON, **references[name]} if name in references else overrides(name)
        cfg = load_config("fashion-mnist", recipe=ROOT / RECIPE, overrides=list(sets.items()))
        splits = build_splits_of(cfg, torch.device("cpu"))
        model = load_model(model_path).train()
        frozen = torch.optim.SGD(model.parameters(), lr=0.0)
        method = METHODS[cfg.train.method](model, frozen, cfg.eps, cfg.method_options)
        torch.manual_seed(1)
        losses = []
        for i, (x, y) in enumerate(splits.train):
            if i == batches:
                break
            losses.append(float(method.step(x, y)["loss"]))
        tail = losses[len(losses) // 2:]
        rows[name] = {"input_ce": statistics.fmean(tail), "batches": len(tail)}
        print(f"{name:32s} {rows[name]['input_ce']:.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "input_ce.json").write_text(json.dumps({"model": str(model_path), "batches": batches, "rows": rows}, indent=1))


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (the report's; NaN for one value)."""
    from atcd_ray.report import mean_interval

    mean, half = mean_interval(values)
    return mean, float("nan") if half is None else half


def table() -> str:
    def runs(name):
        found = {}
        for summary in sorted((OUT / name).glob("seed*/summary.json")):
            s = json.loads(summary.read_text())
            found[s["seed"]] = s
        return found

    ce = json.loads((OUT / "input_ce.json").read_text())["rows"] if (OUT / "input_ce.json").exists() else {}
    base = runs("paper")
    lines = ["| variant | seeds | passes | clean % | PGD-20 % | PGD-20 minus paper (paired) | train s | input CE |",
             "|---|---|---|---|---|---|---|---|"]
    commits = set()
    for name in [*VARIANTS, *COMBINED, *REFERENCES]:
        found = runs(name)
        if not found:
            continue
        commits |= {s["provenance"]["commit"][:7] for s in found.values()}
        clean = interval([100 * s["clean_acc"] for s in found.values()])
        robust = interval([100 * s["robust_acc"]["pgd20"] for s in found.values()])
        paired = [100 * (found[k]["robust_acc"]["pgd20"] - base[k]["robust_acc"]["pgd20"]) for k in found if k in base]
        diff = interval(paired) if name != "paper" and len(paired) > 1 else None
        seconds = statistics.median(s["train_seconds"] for s in found.values())
        passes = next(iter(found.values()))["passes_per_minibatch"]
        lines.append(f"| {name} | {len(found)} | {passes} | {clean[0]:.2f} ± {clean[1]:.2f} | {robust[0]:.2f} ± {robust[1]:.2f} | "
                     + (f"{diff[0]:+.2f} ± {diff[1]:.2f}" if diff else "") + f" | {seconds:.0f} | "
                     + (f"{ce[name]['input_ce']:.3f}" if name in ce else "") + " |")
    lines.append(f"\nCommit(s): {', '.join(sorted(commits))}. ± is the half-width of the 95% t-interval over seeds.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--only", nargs="+")
    ce = sub.add_parser("input-ce")
    ce.add_argument("--model", type=Path, required=True)
    ce.add_argument("--batches", type=int, default=100)
    sub.add_parser("table")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.command == "train":
        train(args.seeds, args.only)
    elif args.command == "input-ce":
        input_ce(args.model, args.batches)
    else:
        print(table())


if __name__ == "__main__":
    main()
