"""Wall time of one evaluation in one process and sharded over Ray actors, side by side.

    python benchmarks/sharded_eval.py CHECKPOINT --attacks autoattack --eval-n 64 --batch-size 16 \
        --workers 0 1 2 --rounds 3

Each round runs ``python -m atcd_ray.evaluate`` once per ``--workers`` value, in turn (interleaved,
so the machine's drift hits every setting alike), each from an empty parts directory. Reported:
the median over rounds of the command's wall seconds (process start, Ray start, actor start and
the evaluation) and of the JSON's ``seconds`` (from Ray's start, if any, to the merge), the
median over rounds of each setting's wall time over the first setting's in the same round, and
whether every run's per-example results were equal.
On one machine ``--workers 1`` is one actor with every core (torch threads), ``--workers 2`` two
actors with half the cores each: the comparison is processes against threads; across nodes the
batches spread as far as there are actors.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--attacks", default="autoattack")
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    wall = {w: [] for w in args.workers}
    inner = {w: [] for w in args.workers}
    correct = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for w in args.workers:
                out = Path(tmp) / f"r{r}-w{w}.json"
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "atcd_ray.evaluate", args.checkpoint, "--attacks", args.attacks,
                                "--eval-n", str(args.eval_n), "--batch-size", str(args.batch_size),
                                "--workers", str(w), "--json", str(out)], check=True, capture_output=True)
                wall[w].append(time.perf_counter() - start)
                result = json.loads(out.read_text())
                inner[w].append(result["seconds"])
                correct.setdefault(w, []).append(result["correct"])
                print(f"round {r + 1} workers {w}: {wall[w][-1]:.1f} s wall, {inner[w][-1]:.1f} s evaluating",
                      file=sys.stderr, flush=True)
    base = args.workers[0]
    figures = {"checkpoint": args.checkpoint, "attacks": args.attacks, "eval_n": args.eval_n,
               "batch_size": args.batch_size, "rounds": args.rounds,
               "equal_per_example": all(c == correct[base][0] for rounds in correct.values() for c in rounds),
               "settings": [{"workers": w, "wall_s": statistics.median(wall[w]), "eval_s": statistics.median(inner[w]),
                             "wall_ratio": statistics.median(a / b for a, b in zip(wall[w], wall[base]))}
                            for w in args.workers]}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
