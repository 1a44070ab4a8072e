"""Print a Markdown table from run summaries: python benchmarks/summaries_table.py runs/*/summary.json

Runs from different commits are refused unless --allow-mixed-commits, which marks each row with its commit."""
import json
import sys
from pathlib import Path

from atcd_ray.cli import run_main
from atcd_ray.report import check_one_commit

ORDER = ["natural", "pgd", "trades", "robust-overfitting", "free", "yopo", "trades-yopo", "fast", "atcd"]
ATTACK_ORDER = ["pgd20", "mifgsm20", "cw20", "tapgd20", "hmc20", "autoattack", "square", "rays"]


def attack_rank(name):
    return next((i for i, prefix in enumerate(ATTACK_ORDER) if name.startswith(prefix)), 99)


def main(argv):
    allow_mixed = "--allow-mixed-commits" in argv
    rows = [json.loads(Path(p).read_text()) for p in argv if p != "--allow-mixed-commits"]
    for row, label in zip(rows, check_one_commit(rows, allow_mixed) or [None] * len(rows)):
        row["label"] = row["method"] + (f" ({label})" if label else "")
    rows.sort(key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 99, r["method"]))
    attacks = sorted(rows[0]["robust_acc"], key=attack_rank)
    natural = next((r["train_seconds"] for r in rows if r["method"] == "natural"), None)
    print("| method | epochs | clean | " + " | ".join(attacks) + " | train s | x natural |")
    print("|---|---|---|" + "---|" * len(attacks) + "---|---|")
    for r in rows:
        ratio = f"{r['train_seconds'] / natural:.1f}" if natural else ""
        cells = [f"{100 * r['robust_acc'][a]:.2f}" for a in attacks]
        print(f"| {r['label']} | {r['epochs']} | {100 * r['clean_acc']:.2f} | " + " | ".join(cells)
              + f" | {r['train_seconds']:.0f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv) or 0, sys.argv[1:]))
