"""Print a Markdown table from run summaries: python benchmarks/summaries_table.py runs/*/summary.json"""
import json
import sys
from pathlib import Path

ORDER = ["natural", "pgd", "free", "fast", "atcd"]


def main(paths):
    rows = [json.loads(Path(p).read_text()) for p in paths]
    rows.sort(key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else 99, r["method"]))
    attacks = list(rows[0]["robust_acc"])
    natural = next((r["train_seconds"] for r in rows if r["method"] == "natural"), None)
    print("| method | epochs | clean | " + " | ".join(attacks) + " | train s | x natural |")
    print("|---|---|---|" + "---|" * len(attacks) + "---|---|")
    for r in rows:
        ratio = f"{r['train_seconds'] / natural:.1f}" if natural else ""
        cells = [f"{100 * r['robust_acc'][a]:.2f}" for a in attacks]
        print(f"| {r['method']} | {r['epochs']} | {100 * r['clean_acc']:.2f} | " + " | ".join(cells)
              + f" | {r['train_seconds']:.0f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
