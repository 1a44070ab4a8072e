"""``python -m atcd_ray.report DIR``: Markdown tables and PNG plots for a run or a sweep.

    python -m atcd_ray.report runs/fashion-mnist-atcd          # a training run
    python -m atcd_ray.report runs/sweeps/lambda-rho           # a sweep of atcd_ray.tune

A run gives its accuracy curves per epoch (the paper's Figure 2), its test table, and robust
accuracy against the number of PGD steps and against eps (Figures 4 and 5), measured on the
first --eval-n test images and cached in the report directory. A sweep gives its results
table and one plot per searched parameter: validation (and test) accuracy against the value,
averaged over repeats (Figures 3, 6 and 7). Files go to DIR/report/ unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from .cli import ArgumentParser, markdown_table, run_main
from .config import ConfigError

CURVES = {"train_train_acc": "train (adversarial batch)", "val_clean_acc": "validation clean",
          "val_robust_acc": "validation robust"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def run_report(run: Path, out: Path, eval_n: int, steps: list[int], eps_scales: list[float]) -> list[Path]:
    from .trainer import read_history, read_summary

    history, summary = read_history(run), read_summary(run)
    plt = pyplot()
    files = []
    epochs = [h["epoch"] for h in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in CURVES.items():
        if history and key in history[0]:
            acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{run.name}: accuracy per epoch")
    acc_ax.legend()
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    files.append(save_figure(fig, out / "curves.png"))

    lines = [f"# Run {run.name}", ""]
    if summary:
        lines += [f"{summary['method']} on {summary['dataset']} ({summary['model']}, eps {summary['eps']:.4g}, "
                  f"seed {summary['seed']}), {summary['epochs']} epochs in {summary['train_seconds']:.0f} s; "
                  f"test on {summary['eval_n']} images, checkpoint {summary['checkpoint']}.", "",
                  markdown_table([{"clean": summary["clean_acc"], **summary["robust_acc"]}],
                                 ["clean", *summary["robust_acc"]]), ""]
    columns = ["epoch", "train_loss", "train_train_acc", "val_clean_acc", "val_robust_acc", "train_lr",
               "train_images_per_second", "train_mh_accept_rate"]
    shown = [c for c in columns if history and c in history[0]]
    rows = [{c: (f"{h[c]:.4g}" if c in ("train_loss", "train_lr", "train_images_per_second") else h[c])
             for c in shown} for h in history]
    lines += ["## Per epoch", "", markdown_table(rows, shown), "", "![accuracy per epoch](curves.png)", ""]

    checkpoint = run / (summary["checkpoint"] if summary else "last.safetensors")
    if eval_n and checkpoint.exists() and (steps or eps_scales):
        curves = attack_curves(checkpoint, out / "attack_curves.json", eval_n, steps, eps_scales)
        eps = curves["eps"]
        for key, xlabel, name in (("steps", "PGD steps (step eps/4)", "attack_steps"),
                                  ("eps_scale", "eps / training eps (PGD-20)", "eps")):
            points = curves[key]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.plot([p["x"] for p in points], [p["acc"] for p in points], marker="o")
            ax.set(xlabel=xlabel, ylabel="robust accuracy",
                   title=f"{run.name}: n={curves['n']}, eps={eps:.4g}")
            files.append(save_figure(fig, out / f"{name}.png"))
            lines += [f"## Robust accuracy against {xlabel}", "",
                      markdown_table([{"x": str(p["x"]), "robust": p["acc"]} for p in points], ["x", "robust"]), "",
                      f"![{name}]({name}.png)", ""]
    files.append(out / "report.md")
    (out / "report.md").write_text("\n".join(lines))
    return files


def attack_curves(checkpoint: Path, cache: Path, eval_n: int, steps: list[int], eps_scales: list[float]) -> dict:
    """PGD-k accuracy for each k, and PGD-20 accuracy at each multiple of the training eps, on the
    first ``eval_n`` test images. Cached: a rerun with the same checkpoint and settings is free."""
    key = {"checkpoint": str(checkpoint.resolve()), "mtime": checkpoint.stat().st_mtime, "n": eval_n,
           "steps": steps, "eps_scales": eps_scales}
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    import torch

    from . import load_model
    from .config import config_from_dict
    from .core.attacks import build_attack
    from .core.checkpoint import Checkpoint
    from .core.engine import evaluate
    from .data import build_splits

    cfg = config_from_dict(Checkpoint(checkpoint).config)
    torch.manual_seed(0)
    model = load_model(checkpoint)
    test = build_splits(cfg.dataset, cfg.data.dir, cfg.eval.batch_size, 0, None, eval_n, None, 0,
                        cfg.data.loader_workers).test
    attacks = {f"steps={k}": build_attack(f"pgd{k}", cfg.eps) for k in steps}
    attacks |= {f"eps_scale={s}": build_attack("pgd20", cfg.eps * s) for s in eps_scales}
    acc = evaluate(model, test, attacks, torch.device("cpu"))
    result = {"key": key, "eps": cfg.eps, "n": test.num_examples, "clean": acc["clean"],
              "steps": [{"x": k, "acc": acc[f"steps={k}"]} for k in steps],
              "eps_scale": [{"x": s, "acc": acc[f"eps_scale={s}"]} for s in eps_scales]}
    cache.write_text(json.dumps(result, indent=2))
    return result


def sweep_report(sweep: Path, out: Path) -> list[Path]:
    import pyarrow.parquet as pq

    rows = pq.read_table(sweep / "results.parquet").to_pylist()
    study = json.loads((sweep / "study.json").read_text())
    params = list(study["params"])
    accuracy = ["val_clean_acc", "val_robust_acc", *[c for c in rows[0] if c.startswith("test_")]]
    plt = pyplot()
    files = []
    lines = [f"# Sweep {study['study']} ({study['dataset']})", "",
             f"{len(rows)} trials; objective: " + " + ".join(f"{w:g} x {k}" for k, w in study["metric"].items())
             + f" ({study['mode']}); fixed: {json.dumps(study['fixed'])}.", "",
             markdown_table([{**r, **{p: str(r[p]) for p in params}} for r in rows],
                            ["trial_id", *params, "status", "epochs", "objective", *accuracy]), ""]
    for param in params:
        groups: dict = {}
        for row in rows:
            groups.setdefault(row[param], []).append(row)
        numeric = all(isinstance(v, (int, float)) for v in groups)
        values = sorted(groups) if numeric else list(groups)
        fig, ax = plt.subplots(figsize=(6, 4))
        by_value = {v: {param: str(v)} for v in values}
        for column in accuracy:
            means = [_mean([r[column] for r in groups[v]]) for v in values]
            spreads = [_std([r[column] for r in groups[v]]) for v in values]
            x = values if numeric else range(len(values))
            ax.errorbar(x, means, yerr=spreads, marker="o", capsize=3, label=column)
            for v, m in zip(values, means):
                if m is not None:
                    by_value[v][column] = m
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=20, ha="right")
        ax.set(xlabel=param, ylabel="accuracy", title=f"{study['study']}: accuracy against {param}")
        ax.legend(fontsize=8)
        name = "".join(c if c.isalnum() else "_" for c in param).strip("_") + ".png"
        files.append(save_figure(fig, out / name))
        lines += [f"## Accuracy against {param} (mean over repeats)", "",
                  markdown_table(list(by_value.values()), [param, *accuracy]), "", f"![{param}]({name})", ""]
    files.append(out / "report.md")
    (out / "report.md").write_text("\n".join(lines))
    return files


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _numbers(text: str, kind):
    try:
        return [kind(v) for v in text.split(",") if v]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a run directory (metrics.jsonl) or a sweep directory (results.parquet)")
    p.add_argument("--out", help="where the report goes (default: DIR/report)")
    p.add_argument("--eval-n", type=int, default=500, help="test images for the attack curves; 0: none")
    p.add_argument("--steps", default="1,2,5,10,20,50", help="PGD steps for the steps curve")
    p.add_argument("--eps-scales", default="0.25,0.5,1,1.5,2", help="multiples of the training eps (PGD-20)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    directory = Path(args.dir)
    steps, scales = _numbers(args.steps, int), _numbers(args.eps_scales, float)
    if args.eval_n < 0 or any(k < 1 for k in steps) or any(s <= 0 for s in scales):
        raise ConfigError("--eval-n must be >= 0, --steps >= 1 and --eps-scales > 0")
    out = Path(args.out or directory / "report")
    if (directory / "results.parquet").exists():
        out.mkdir(parents=True, exist_ok=True)
        files = sweep_report(directory, out)
    elif (directory / "metrics.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        files = run_report(directory, out, args.eval_n, steps, scales)
    else:
        raise ConfigError(f"{directory}: neither a run (metrics.jsonl) nor a sweep (results.parquet)")
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
