"""Markdown table of the strong attacks written by benchmarks/fashion_mnist_table.sh:
python benchmarks/strong_table.py runs/fashion-mnist-table"""
import json
import sys
from pathlib import Path

from summaries_table import ORDER


def main(out_dir):
    out = Path(out_dir)
    print("| method | clean (n=AA) | pgd20 (n=AA) | autoattack | clean (n=RayS) | pgd20 (n=RayS) | rays1000 |")
    print("|---|---|---|---|---|---|---|")
    sizes = set()
    for method in ORDER:
        aa, rays = out / f"{method}.aa.json", out / f"{method}.rays.json"
        if not (aa.exists() and rays.exists()):
            continue
        aa, rays = json.loads(aa.read_text()), json.loads(rays.read_text())
        sizes.add((aa["n"], rays["n"]))
        cells = [aa["clean_acc"], aa["robust_acc"]["pgd20"], aa["robust_acc"]["autoattack"],
                 rays["clean_acc"], rays["robust_acc"]["pgd20"], rays["robust_acc"]["rays1000"]]
        flag = " (masking suspected)" if aa["gradient_masking_suspected"] or rays["gradient_masking_suspected"] else ""
        print(f"| {method}{flag} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + " |")
    for n_aa, n_rays in sorted(sizes):
        print(f"\nn = {n_aa} test images for AutoAttack, {n_rays} for RayS (the first of the test split).")


if __name__ == "__main__":
    main(sys.argv[1])
