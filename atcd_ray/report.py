"""``python -m atcd_ray.report DIR``: Markdown tables and PNG plots for a run or a sweep.

    python -m atcd_ray.report runs/fashion-mnist-atcd          # a training run
    python -m atcd_ray.report runs/sweeps/lambda-rho           # a sweep of atcd_ray.tune
    python -m atcd_ray.report runs/fashion-mnist-budget        # a budget study of atcd_ray.study

A run gives its accuracy curves per epoch (the paper's Figure 2), its test table, and robust
accuracy against the number of PGD steps and against eps (Figures 4 and 5), measured on the
first --eval-n test images and cached in the report directory. A run evaluated with AutoAttack
(``python -m atcd_ray.evaluate RUN/CHECKPOINT --attacks autoattack --json RUN/aa.json``) also
gets a RobustBench-style entry, robustbench.json (clean and AutoAttack accuracy, eps, threat
model, architecture, the AutoAttack code and version, the number of test images, the commit). A sweep gives its results
table and one plot per searched parameter: validation (and test) accuracy against the value,
averaged over repeats (Figures 3, 6 and 7). Files go to DIR/report/ unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from .budget import (COLLAPSED, EMA_SUFFIX, OBJECTIVE, BudgetStudy, cell_dir, run_collapsed, search_done,
                     set_aside_trials, winner, winner_key)
from .cli import ArgumentParser, markdown_table, run_main
from .config import ConfigError
from .core.checkpoint import write_json_atomic, write_text_atomic
from .figures import pyplot, save_figure
from .storage import is_uri

CURVES = {"train_train_acc": "train (adversarial batch)", "val_clean_acc": "validation clean",
          "val_robust_acc": "validation robust"}


def commit_label(record: dict) -> str:
    """The commit a summary.json (or an evaluation's JSON) records, short, '+dirty' when tracked
    files differed from it; 'unknown' for runs that predate the record."""
    provenance = record.get("provenance") or {}
    labels = []
    for segment in [*provenance.get("earlier", []), provenance]:  # a run resumed on other code: each
        label = segment["commit"][:10] + ("+dirty" if segment.get("dirty") else "") if segment.get("commit") \
            else "unknown"
        labels += [label] if label not in labels else []
    return labels[0] if len(labels) == 1 else "mixed(" + ", ".join(labels) + ")"


def check_one(labels: list[str], allow_mixed: bool, refusal: str) -> list[str] | None:
    """None when every record has one label (one commit, one machine). Otherwise a ConfigError,
    ``refusal`` with the labels counted, or with ``allow_mixed`` the labels, for the table to mark
    its rows with."""
    if len(set(labels)) <= 1:
        return None
    if not allow_mixed:
        counts = "; ".join(f"{label} ({labels.count(label)})" for label in dict.fromkeys(labels))
        raise ConfigError(refusal.format(counts))
    return labels


def check_one_commit(records: list[dict], allow_mixed: bool) -> list[str] | None:
    return check_one([commit_label(r) for r in records], allow_mixed,
                     "these runs come from different commits: {}; rerun them at one commit, "
                     "or pass --allow-mixed-commits to mark each row with its commit")


def machine_label(summary: dict) -> str:
    """The machine a summary's seconds were measured on: a CPU's name, generation and cores."""
    hw = summary.get("hardware", {})
    return f"{hw.get('cpu')}, {hw.get('cpu_id') or 'generation not recorded'}, {hw.get('cpu_count')} cores" + \
        (f", {hw['gpu']}" if hw.get("gpu") else "")


def run_report(run: Path, out: Path, *, eval_n: int, steps: list[int], eps_scales: list[float]) -> list[Path]:
    from .run_dir import read_history, read_summary

    history, summary = read_history(run), read_summary(run)
    plt = pyplot()
    files = []
    epochs = [h["epoch"] for h in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in CURVES.items():  # train.val_every > 1: the validated epochs only
        points = [(epoch, h[key]) for epoch, h in zip(epochs, history) if key in h]
        if points:
            acc_ax.plot(*zip(*points), marker="o", label=label)
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
    shown = [c for c in columns if any(c in h for h in history)]
    rows = [{c: (f"{h[c]:.4g}" if c in ("train_loss", "train_lr", "train_images_per_second") else h.get(c, ""))
             for c in shown} for h in history]
    lines += ["## Per epoch", "", markdown_table(rows, shown), "", "![accuracy per epoch](curves.png)", ""]

    evaluation = autoattack_evaluation(run)
    if evaluation:
        entry = robustbench_entry(evaluation, summary)
        files.append(out / "robustbench.json")
        write_json_atomic(out / "robustbench.json", entry)
        lines += ["## RobustBench-style entry", "",
                  f"From {evaluation['_file']} (commit {entry['commit']}): written to robustbench.json.", "",
                  markdown_table([{k: entry[k] for k in ENTRY_COLUMNS}], list(ENTRY_COLUMNS)), ""]
        if entry["autoattack_flags"] is None:
            lines += ["AutoAttack's own warnings: not recorded (evaluated by code that did not keep them).", ""]
        for batch, flags in (entry["autoattack_flags"] or {}).items():
            lines += [f"AutoAttack's own checks warned on batch {batch}: " + " | ".join(flags), ""]

    checkpoint = run / (summary["checkpoint"] if summary else "last.safetensors")
    if eval_n and checkpoint.exists() and (steps or eps_scales):
        curves = attack_curves(checkpoint, out / "attack_curves.json", eval_n=eval_n, steps=steps,
                               eps_scales=eps_scales)
        lines += plot_attack_curves(curves, out, title=run.name, files=files,
                                    autoattack=evaluation if evaluation and Path(
                                        evaluation["checkpoint"]).name == checkpoint.name else None)
    files.append(out / "report.md")
    write_text_atomic(out / "report.md", "\n".join(lines))
    return files


def plot_attack_curves(curves: dict, out: Path, *, title: str, files: list[Path],
                       autoattack: dict | None) -> list[str]:
    """Accuracy against PGD's steps and against the attack's eps (``attack_curves``), each a plot
    (added to ``files``) and a table; the report's lines. ``autoattack``: the plotted model's
    AutoAttack evaluation, a point on the eps plot."""
    plt, eps, lines = pyplot(), curves["eps"], []
    for key, xlabel, name in (("steps", "PGD steps (step eps/4)", "attack_steps"),
                              ("eps_scale", "eps of the attack (PGD-20; 0: clean)", "eps")):
        points = curves[key]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        if key == "eps_scale":  # absolute eps, from clean accuracy at 0
            points = [{"x": 0.0, "acc": curves["clean"]}, *({"x": p["x"] * eps, "acc": p["acc"]} for p in points)]
            ax.axvline(eps, color="grey", ls=":", lw=1, label=f"training eps {eps:.4g}")
            if autoattack:
                ax.plot([autoattack["eps"]], [autoattack["robust_acc"]["autoattack"]], "r*", ms=10,
                        label=f"AutoAttack (n={autoattack['n']})")
            ax.legend(fontsize=8)
        ax.plot([p["x"] for p in points], [p["acc"] for p in points], marker="o")
        ax.set(xlabel=xlabel, ylabel="accuracy", title=f"{title}: n={curves['n']}, eps={eps:.4g}")
        files.append(save_figure(fig, out / f"{name}.png"))
        lines += [f"## Accuracy against {xlabel}", "",
                  markdown_table([{"x": f"{p['x']:.4g}", "accuracy": p["acc"]} for p in points],
                                 ["x", "accuracy"]), "", f"![{name}]({name}.png)", ""]
    return lines


ENTRY_COLUMNS = ("architecture", "dataset", "threat_model", "eps", "clean_acc", "autoattack_acc", "n_examples",
                 "attack")


def autoattack_evaluation(run: Path) -> dict | None:
    """The run's AutoAttack evaluation on the most images: a ``python -m atcd_ray.evaluate --json``
    file in the run directory whose attacks include ``autoattack``."""
    found = []
    for path in sorted(run.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("robust_acc"), dict) and "n" in record \
                and "autoattack" in record["robust_acc"]:
            found.append({**record, "_file": path.name})
    return max(found, key=lambda r: r["n"], default=None)


def eps_text(eps: float) -> str:
    """RobustBench writes eps as k/255 where a short decimal would not do (8/255, not 0.0313725)."""
    k, decimal = eps * 255, f"{eps:g}"
    return f"{round(k)}/255" if len(decimal) > 5 and abs(k - round(k)) < 1e-6 else decimal


def robustbench_entry(evaluation: dict, summary: dict | None) -> dict:
    """RobustBench's model-info fields (percentages as strings with two decimals; the paper's own
    fields left null), then what a reader needs to trust the figures: how many test images, which
    AutoAttack, which commit."""
    architecture = evaluation.get("model") or (summary or {}).get("model")
    return {"link": None, "name": f"{evaluation['method']} {architecture} (atcd_ray)", "authors": None,
            "additional_data": False, "number_forward_passes": 1, "dataset": evaluation["dataset"], "venue": None,
            "architecture": architecture, "eps": eps_text(evaluation["eps"]),
            "clean_acc": f"{100 * evaluation['clean_acc']:.2f}", "reported": None,
            "autoattack_acc": f"{100 * evaluation['robust_acc']['autoattack']:.2f}",
            "threat_model": evaluation.get("threat_model", "Linf"), "n_examples": evaluation["n"],
            "attack": evaluation.get("attack_versions", {}).get("autoattack", "AutoAttack standard"),
            "seed": evaluation.get("seed"), "checkpoint": Path(evaluation["checkpoint"]).name,
            "commit": commit_label(evaluation),
            # pyautoattack's own warnings by batch ({}: none); None: not recorded (evaluated before they were)
            "autoattack_flags": evaluation.get("autoattack_flags")}


def attack_curves(checkpoint: Path, cache: Path, *, eval_n: int, steps: list[int], eps_scales: list[float]) -> dict:
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
    from .data import build_test_split

    cfg = config_from_dict(Checkpoint(checkpoint).config)
    torch.manual_seed(0)
    model = load_model(checkpoint)
    test = build_test_split(cfg.dataset, data_dir=cfg.data.dir, batch_size=cfg.eval.batch_size, eval_n=eval_n, seed=0,
                            loader_workers=cfg.data.loader_workers)
    attacks = {f"steps={k}": build_attack(f"pgd{k}", cfg.eps) for k in steps}
    attacks |= {f"eps_scale={s}": build_attack("pgd20", cfg.eps * s) for s in eps_scales}
    acc = evaluate(model, test, attacks, torch.device("cpu"))
    result = {"key": key, "eps": cfg.eps, "n": test.num_examples, "clean": acc["clean"],
              "steps": [{"x": k, "acc": acc[f"steps={k}"]} for k in steps],
              "eps_scale": [{"x": s, "acc": acc[f"eps_scale={s}"]} for s in eps_scales]}
    write_json_atomic(cache, result)
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
    write_text_atomic(out / "report.md", "\n".join(lines))
    return files


def set_aside_section(spec: BudgetStudy, directory: Path) -> list[str]:
    """The winners the stability rule set aside (``budget.set_aside_collapsed``), if any: the
    lines of a section naming each one's trial and the seeds on which its runs collapsed."""
    from .data import DATASETS

    rows, classes = [], DATASETS[spec.dataset].num_classes
    for aside in sorted(directory.glob(f"final/*/*/{COLLAPSED}/*/*")):
        seeds = sorted(aside.glob("seed*"))
        fell = [run.name for run in seeds if run_collapsed(run, classes)]
        rows.append({"network": aside.parts[-5], "budget": aside.parts[-4].removeprefix("budget"),
                     "method": aside.parts[-2], "trial": aside.name, "collapsed seeds": ", ".join(fell),
                     "seeds run": len(seeds)})
    if not rows:
        return []
    return ["## Winners set aside by the stability rule (their runs collapsed; the next-best trial is above)", "",
            markdown_table(rows, list(rows[0])), ""]


def budget_study_report(directory: Path, out: Path, *, allow_mixed: bool = False, target_clean: float = 0.85,
                        target_robust: float = 0.74, allow_mixed_machines: bool = False) -> list[Path]:
    """The study's tables and plots: the search per cell, the finals (mean over seeds), time to
    the target accuracies, and PGD-20 and AutoAttack accuracy against budget and wall seconds."""
    spec = BudgetStudy(**json.loads((directory / "budget_study.json").read_text()))
    search_rows, finals = collect_study(spec, directory)
    records = [r for row in finals for r in row["_records"]]  # summaries and AutoAttack evaluations
    labels, mixed_machines, machines = _label_provenance(finals, allow_mixed=allow_mixed,
                                                         allow_mixed_machines=allow_mixed_machines)
    lines = [f"# Budget study {spec.study} ({spec.dataset})", "",
             f"Budgets {', '.join(f'{b:g}' for b in spec.budgets)} natural-epoch equivalents (forward+backward passes "
             f"over the training set); {spec.trials} trials per searched method, network and budget, selected by "
             f"validation robust accuracy; search overrides: {json.dumps(spec.search)}.", ""]
    files = []
    if finals:
        first = records[0]
        commits = ", ".join(dict.fromkeys(commit_label(r) for r in records))
        torch_version = first["provenance"].get("versions", {}).get("torch")
        lines += [f"Finals: commit {commits}, timed on {machines} (torch {torch_version}); "
                  f"{first['train_examples']} training images, {first['eval_n']} test images.", ""]
        lines += _time_to_target(finals, target_clean=target_clean, target_robust=target_robust)
        columns = ["network", "budget", "method", "knobs", "passes", "epochs", "seeds", "train s", "clean", "pgd20",
                   "tapgd20", "autoattack", "pgd20 (AA images)", "AA n", "AA seeds", *(["commit"] if labels else []),
                   *(["machine"] if mixed_machines else [])]
        shown = [{**row, **{k: _with_interval(row, k) for k in INTERVALS}} for row in finals]
        lines += ["## Winners on the whole training set (mean and 95% t interval over seeds, %)", "",
                  markdown_table(shown, columns), ""]
        lines += _atcd_against_the_others(finals, reference=spec.reference)
        lines += set_aside_section(spec, directory)
        for model in spec.models:
            files.append(plot_study([r for r in finals if r["network"] == model], out / f"budget_{model}.png",
                                    title=model, reference=spec.reference))
            lines += [f"![{model}](budget_{model}.png)", ""]
    lines += ["## The search (validation PGD-10 accuracy of the trials)", "",
              markdown_table(search_rows, ["network", "budget", "method", "trials", "diverged", "best val PGD-10",
                                           "median val PGD-10", *(["trial 0 val PGD-10"] * bool(
                                               spec.points_to_evaluate))]), ""]
    files.append(out / "report.md")
    write_text_atomic(out / "report.md", "\n".join(lines))
    return files


def _label_provenance(finals: list[dict], *, allow_mixed: bool,
                      allow_mixed_machines: bool) -> tuple[bool, bool, str]:
    """Refuses finals of several commits or machines unless allowed; where allowed, each row names
    its own (``commit``, ``machine``). Returns whether the commits and the machines are mixed, and
    the machines the finals were timed on."""
    records = [r for row in finals for r in row["_records"]]
    labels = check_one_commit(records, allow_mixed)
    summaries = [s for row in finals for s in row["_summaries"]]
    # Seconds measured on two CPU generations do not compare
    mixed_machines = check_one([machine_label(s) for s in summaries], allow_mixed_machines,
                               "these runs were timed on different machines: {}; their seconds do not compare: "
                               "rerun them on one, or pass --allow-mixed-machines to name each row's")
    for row in finals:
        if labels:
            row["commit"] = ", ".join(sorted({commit_label(r) for r in row["_records"]}))
        if mixed_machines:
            row["machine"] = "; ".join(sorted({machine_label(s) for s in row["_summaries"]}))
        del row["_records"], row["_summaries"]  # _half and _by_seed stay: the tables and plots read them
    return bool(labels), bool(mixed_machines), "; ".join(dict.fromkeys(machine_label(s) for s in summaries))


def _time_to_target(finals: list[dict], *, target_clean: float, target_robust: float) -> list[str]:
    """The section of the fastest final (train seconds) of each method that reached both targets."""
    reached = [r for r in finals if r["clean"] >= target_clean and r["pgd20"] >= target_robust]
    fastest = {}
    for row in sorted(reached, key=lambda r: r["train s"]):
        fastest.setdefault(row["method"], row)
    return [f"## Time to {target_robust:.0%} PGD-20 and {target_clean:.0%} clean accuracy (whole test set)", "",
            markdown_table(list(fastest.values()), ["method", "network", "budget", "train s", "clean", "pgd20"])
            if fastest else "No recipe reached both.", ""]


def _atcd_against_the_others(finals: list[dict], *, reference: str) -> list[str]:
    """The sections of ATCD's paired differences: to the best other method, then to each one."""
    contest = paired_differences(finals, challenger="atcd", reference=reference)
    if not contest:
        return []
    every = paired_differences(finals, challenger="atcd", reference=reference, every=True)
    return ["## ATCD against the best other method, paired by seed (ATCD minus it, points, 95% t "
            "interval)", "", markdown_table(contest, list(dict.fromkeys(k for r in contest for k in r))), "",
            "## ATCD against each other method, paired by seed (ATCD minus it, points, 95% t interval; "
            "best first)", "", markdown_table(every, list(dict.fromkeys(k for r in every for k in r))), ""]


def collect_study(spec, directory: Path) -> tuple[list[dict], list[dict]]:
    """A study's search (a row per cell: trials, best and median validation accuracy) and its
    finals (a row per cell and method, the weight-averaged ones too: ``_final_row``)."""
    import pyarrow.parquet as pq

    winners_path = directory / "winners.json"
    winners = json.loads(winners_path.read_text()) if winners_path.exists() else {}
    search_rows, finals = [], []
    for model, budget, i in spec.cells():
        averaged = sorted(p.name for p in (directory / "final" / model / f"budget{budget:g}").glob(f"*{EMA_SUFFIX}"))
        for method in [spec.reference, *spec.methods, *averaged]:
            sweep = cell_dir(directory, "search", model=model, budget=budget, method=method)
            searched = search_done(spec, sweep)
            if searched:
                trials = pq.read_table(sweep / "results.parquet").to_pylist()
                scores = [t[OBJECTIVE] for t in trials if t["status"] == "completed"]
                search_rows.append({"network": model, "budget": f"{budget:g}", "method": method, "trials": len(trials),
                                    "diverged": sum(t["status"] == "diverged" for t in trials),
                                    "best val PGD-10": max(scores, default=None),
                                    "median val PGD-10": statistics.median(scores) if scores else None,
                                    # the searcher's fixed first trial: the method's published setting
                                    "trial 0 val PGD-10": next((t[OBJECTIVE] for t in trials
                                                                if t.get("trial_number") == 0), None)})
            runs = sorted(cell_dir(directory, "final", model=model, budget=budget,
                                   method=method).glob("seed*/summary.json"))
            if runs:
                summaries = [json.loads(p.read_text()) for p in runs]
                evaluations = {s["seed"]: json.loads((p.parent / "autoattack.json").read_text())  # by the run's seed
                               for s, p in zip(summaries, runs) if (p.parent / "autoattack.json").exists()}
                chosen = winners.get(winner_key(model, budget, method))
                if chosen is None and searched:  # winners.json comes once all are trained
                    chosen = winner(spec, directory, model=model, budget=budget, method=method,
                                    passed_over=set_aside_trials(directory, model=model, budget=budget, method=method))
                finals.append(_final_row(model, budget, method, chosen=chosen or {}, summaries=summaries,
                                         evaluations=evaluations))
    return search_rows, finals


def plot_study(rows: list[dict], path: Path, *, title: str, reference: str | None = None) -> Path:
    """PGD-20 accuracy against budget and against wall seconds (with the Pareto front), AutoAttack
    accuracy against budget: a line per method, its 95% t intervals over seeds as bars. The
    ``reference`` (natural training, robust accuracy near 0) is left out: on the same axis it
    would squeeze every robust method into a band a few pixels high."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if (highest := max((r["pgd20"] for r in rows if r["method"] == reference), default=None)) is not None:
        rows = [r for r in rows if r["method"] != reference]
        fig.text(0.5, 0.005, f"{reference}, the reference (PGD-20 at most {highest:.1%}), is not drawn nor on the "
                 "Pareto front", ha="center", fontsize=8)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget_value"])
        bars = [r["_half"]["pgd20"] or 0.0 for r in mine]  # one seed: no bar
        axes[0].errorbar([r["budget_value"] for r in mine], [r["pgd20"] for r in mine], yerr=bars,
                         marker="o", capsize=3, label=method)
        axes[1].errorbar([r["train s"] for r in mine], [r["pgd20"] for r in mine], yerr=bars, marker="o",
                         capsize=3, label=method)
        with_aa = [r for r in mine if r["autoattack"] is not None]
        axes[2].errorbar([r["budget_value"] for r in with_aa], [r["autoattack"] for r in with_aa],
                         yerr=[r["_half"]["autoattack"] or 0.0 for r in with_aa], marker="o", capsize=3,
                         label=method)
    front = _pareto(rows, "train s", "pgd20")
    axes[1].plot([r["train s"] for r in front], [r["pgd20"] for r in front], "k--", lw=1, label="Pareto front")
    budget_axis = "budget (natural epochs)"
    for ax, xlabel, ylabel in zip(axes, [budget_axis, "training wall seconds", budget_axis],
                                  ["PGD-20 accuracy", "PGD-20 accuracy", "AutoAttack accuracy"]):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}: {ylabel} against {xlabel.split(' (')[0]}")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


INTERVALS = ("clean", "pgd20", "tapgd20", "autoattack", "pgd20 (AA images)")


def _final_row(model, budget, method, *, chosen, summaries, evaluations) -> dict:
    """One row of the finals: a cell's runs and their AutoAttack evaluations (by the run's seed),
    each accuracy as its
    mean over seeds (``_half``: the 95% t interval's half-width; ``_by_seed``: seed -> value)."""
    first = summaries[0]
    by_seed = {"clean": {s["seed"]: s["clean_acc"] for s in summaries},
               "pgd20": {s["seed"]: s["robust_acc"]["pgd20"] for s in summaries},
               "tapgd20": {s["seed"]: s["robust_acc"].get("tapgd20") for s in summaries},
               "autoattack": {seed: e["robust_acc"]["autoattack"] for seed, e in evaluations.items()},
               "pgd20 (AA images)": {seed: e["robust_acc"]["pgd20"] for seed, e in evaluations.items()}}
    by_seed = {k: {seed: v for seed, v in values.items() if v is not None} for k, values in by_seed.items()}
    stats = {k: mean_interval(list(values.values())) for k, values in by_seed.items()}
    return {"network": model, "budget": f"{budget:g}", "budget_value": budget, "method": method,
            "knobs": ", ".join(_knob(k, v) for k, v in chosen.get("params", {}).items()) or "recipe",
            "passes": first["passes_per_minibatch"], "epochs": first["epochs"], "seeds": len(summaries),
            "train s": round(_mean([s["train_seconds"] for s in summaries])),
            **{k: mean for k, (mean, _) in stats.items()},
            "AA n": next(iter(evaluations.values()))["n"] if evaluations else None, "AA seeds": len(evaluations),
            "_half": {k: half for k, (_, half) in stats.items()}, "_by_seed": by_seed,
            "_records": [*summaries, *evaluations.values()], "_summaries": summaries}


def mean_interval(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its 95% Student t interval (None for fewer than two values)."""
    if not values:
        return None, None
    if len(values) < 2:
        return statistics.fmean(values), None
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values), float(half)


def _with_interval(row: dict, key: str) -> str | None:
    mean, half = row[key], row["_half"][key]
    if mean is None:
        return None
    return f"{100 * mean:.2f}" + (f" ± {100 * half:.2f}" if half is not None else "")


def paired_differences(finals: list[dict], *, challenger: str, reference: str, every: bool = False) -> list[dict]:
    """Per network and budget: ``challenger`` minus the best other method by mean PGD-20 (not the
    reference, nor a weight-averaged variant), or with ``every`` minus each of them, best first
    (and each variant, as ``atcd+ema``, minus the others' same variant), seed by seed, for each
    accuracy both have, with the 95% t interval of the mean difference and a verdict (wins: the
    interval is above 0; loses: below; ties: it holds 0)."""
    rows = []
    for network, budget in dict.fromkeys((r["network"], r["budget"]) for r in finals):
        cell = [r for r in finals if (r["network"], r["budget"]) == (network, budget)]
        variants = ["", *sorted({r["method"][r["method"].index("+"):] for r in cell if "+" in r["method"]})]
        for variant in variants[:None if every else 1]:
            mine = [r for r in cell if r["method"] == challenger + variant]
            others = sorted((r for r in cell if r["method"] not in (challenger + variant, reference + variant)
                             and r["method"].endswith(variant) and "+" not in r["method"].removesuffix(variant)),
                            key=lambda r: r["pgd20"], reverse=True)
            if mine and every:
                rows += [_paired_row(mine[0], other, label="against") for other in others]
            elif mine and others:
                rows.append({k: v for k, v in _paired_row(mine[0], others[0], label="best other").items()
                             if k != "method"})
    return rows


def _paired_row(mine: dict, other: dict, *, label: str) -> dict:
    row = {"network": other["network"], "budget": other["budget"], "method": mine["method"], label: other["method"]}
    for key in ("pgd20", "clean", "autoattack"):
        seeds = sorted(set(mine["_by_seed"][key]) & set(other["_by_seed"][key]))
        if len(seeds) < 2:
            continue
        mean, half = mean_interval([mine["_by_seed"][key][s] - other["_by_seed"][key][s] for s in seeds])
        verdict = "wins" if mean - half > 0 else "loses" if mean + half < 0 else "ties"
        row[f"{key} difference"] = f"{100 * mean:+.2f} ± {100 * half:.2f} ({len(seeds)} seeds): {verdict}"
    return row


def _knob(key: str, value) -> str:
    if isinstance(value, str) and "=" in value:  # a bundle's label: "T=2, K=1"
        return value
    name = key.rsplit(".", 1)[-1]
    return f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"


def _pareto(rows: list[dict], cost: str, value: str) -> list[dict]:
    """The rows no other row beats on both: less cost and more value, by increasing cost."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r[cost], -r[value])):
        if row[value] > best:
            front.append(row)
            best = row[value]
    return front


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
    p.add_argument("dir", help="a run directory (metrics.jsonl; or its URI, s3://...) or a sweep directory "
                               "(results.parquet)")
    p.add_argument("--out", help="where the report goes (default: DIR/report)")
    p.add_argument("--eval-n", type=int, default=500, help="test images for the attack curves; 0: none")
    p.add_argument("--steps", default="1,2,5,10,20,50", help="PGD steps for the steps curve")
    p.add_argument("--eps-scales", default="0.25,0.5,1,1.5,2", help="multiples of the training eps (PGD-20)")
    p.add_argument("--allow-mixed-commits", action="store_true",
                   help="a study's table may mix runs of different commits (each row is then marked)")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="a study's table may mix runs timed on different machines (each row is then marked)")
    p.add_argument("--target-clean", type=float, default=0.85, help="a study's 'time to' target, clean accuracy")
    p.add_argument("--target-robust", type=float, default=0.74, help="a study's 'time to' target, PGD-20 accuracy")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not is_uri(args.dir):
        return report(args)
    import tempfile

    from .storage import RunUpload, download_run

    # A run on object storage: reported from a local copy, and the report copied back beside it.
    uri = args.dir.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="atcd-report-") as copy:
        args.dir, out = download_run(uri, Path(copy)), args.out
        args.out = out or str(Path(copy) / "report")
        code = report(args)
        if not out:
            RunUpload(Path(args.out), f"{uri}/report")()
            print(f"copied to {uri}/report/")
        return code


def report(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    steps, scales = _numbers(args.steps, int), _numbers(args.eps_scales, float)
    if args.eval_n < 0 or any(k < 1 for k in steps) or any(s <= 0 for s in scales):
        raise ConfigError("--eval-n must be >= 0, --steps >= 1 and --eps-scales > 0")
    out = Path(args.out or directory / "report")
    if (directory / "budget_study.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        files = budget_study_report(directory, out, allow_mixed=args.allow_mixed_commits,
                                    target_clean=args.target_clean, target_robust=args.target_robust,
                                    allow_mixed_machines=args.allow_mixed_machines)
    elif (directory / "results.parquet").exists():
        out.mkdir(parents=True, exist_ok=True)
        files = sweep_report(directory, out)
    elif (directory / "metrics.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        files = run_report(directory, out, eval_n=args.eval_n, steps=steps, eps_scales=scales)
    else:
        raise ConfigError(f"{directory}: neither a run (metrics.jsonl), a sweep (results.parquet) nor a budget study "
                          "(budget_study.json)")
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
