"""Markdown table of the strong attacks written by benchmarks/fashion_mnist_table.sh:
python benchmarks/strong_table.py runs/fashion-mnist-table [--allow-mixed-commits]"""
import json
import sys
from pathlib import Path

from summaries_table import ORDER

from atcd_ray.cli import run_main
from atcd_ray.report import check_one_commit


def main(argv):
    out, allow_mixed = Path(argv[0]), "--allow-mixed-commits" in argv
    found = [m for m in ORDER if (out / f"{m}.aa.json").exists() and (out / f"{m}.rays.json").exists()]
    records = [json.loads((out / f"{m}.{kind}.json").read_text()) for m in found for kind in ("aa", "rays")]
    labels = check_one_commit(records, allow_mixed)
    marks = {m: f" ({labels[2 * i]}, {labels[2 * i + 1]})" if labels else "" for i, m in enumerate(found)}
    print("| method | clean (n=AA) | pgd20 (n=AA) | autoattack | clean (n=RayS) | pgd20 (n=RayS) | rays1000 |")
    print("|---|---|---|---|---|---|---|")
    sizes = set()
    for method in found:
        aa, rays = json.loads((out / f"{method}.aa.json").read_text()), json.loads((out / f"{method}.rays.json").read_text())
        sizes.add((aa["n"], rays["n"]))
        cells = [aa["clean_acc"], aa["robust_acc"]["pgd20"], aa["robust_acc"]["autoattack"],
                 rays["clean_acc"], rays["robust_acc"]["pgd20"], rays["robust_acc"]["rays1000"]]
        flag = " (masking suspected)" if aa["gradient_masking_suspected"] or rays["gradient_masking_suspected"] else ""
        print(f"| {method}{marks[method]}{flag} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + " |")
    for n_aa, n_rays in sorted(sizes):
        print(f"\nn = {n_aa} test images for AutoAttack, {n_rays} for RayS (the first of the test split).")


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv) or 0, sys.argv[1:]))
