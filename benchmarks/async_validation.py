"""Training wall time per epoch with the per-epoch robust validation on the workers and as a Ray
task beside them (train.val_async), side by side.

    python benchmarks/async_validation.py --recipe pipelines/fashion-mnist_smallcnn.yaml --rounds 3 \
        --json docs/perf/async_validation.json

Each round runs ``python -m atcd_ray.train`` once per setting, in turn (interleaved, so the
machine's drift hits every setting alike), each into an empty run directory:
- ``sync-1``: one Ray worker of 1 CPU that validates after each epoch (train.val_async=false);
- ``async-1+1``: one Ray worker of 1 CPU and a validation task of 1 CPU (train.val_async=true);
- ``sync-all``: one Ray worker with every CPU, validating after each epoch (the default on one machine).
Reported per setting, medians over rounds: the wall seconds per epoch from the end of epoch 1 to
the end of the last (training, validation when the worker does it, checkpoint and report), the
validation's seconds per epoch, the command's wall seconds, and the ratio of each setting's
seconds per epoch to ``sync-1``'s in the same round.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"sync-1": ["--cpus-per-worker", "1"],
            "async-1+1": ["--cpus-per-worker", "1", "--set", "train.val_async=true", "--set", "train.val_cpus=1"],
            "sync-all": []}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--recipe", help="a recipe YAML (default: the dataset's)")
    p.add_argument("--method", default="atcd")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--val-n", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    per_epoch, val_s, wall = ({s: [] for s in args.settings} for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in args.settings:
                out = Path(tmp) / f"r{r}-{setting}"
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "atcd_ray.train", args.dataset, "--method", args.method,
                                *(["--recipe", args.recipe] if args.recipe else []),
                                "--epochs", str(args.epochs), "--subset", str(args.subset), "--eval-n", "100",
                                "--out", str(out), "--seed", "0", "--quiet", "--set", f"train.val_n={args.val_n}",
                                "--set", "eval.attacks=[pgd10]", *SETTINGS[setting]], check=True, capture_output=True)
                wall[setting].append(time.perf_counter() - start)
                history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                per_epoch[setting].append((history[-1]["finished_at"] - history[0]["finished_at"]) / (len(history) - 1))
                val_s[setting].append(statistics.mean(h["val_seconds"] for h in history))
                print(f"round {r + 1} {setting}: {per_epoch[setting][-1]:.1f} s per epoch, validation "
                      f"{val_s[setting][-1]:.1f} s, {wall[setting][-1]:.0f} s wall", file=sys.stderr, flush=True)
    base = args.settings[0]
    figures = {"dataset": args.dataset, "recipe": args.recipe, "method": args.method, "epochs": args.epochs,
               "subset": args.subset, "val_n": args.val_n, "rounds": args.rounds, "seed": 0,
               "settings": [{"setting": s, "seconds_per_epoch": statistics.median(per_epoch[s]),
                             "validation_seconds": statistics.median(val_s[s]), "wall_s": statistics.median(wall[s]),
                             "per_epoch_ratio": statistics.median(a / b for a, b in zip(per_epoch[s], per_epoch[base]))}
                            for s in args.settings]}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
