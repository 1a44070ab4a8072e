"""Budgets in passes, provenance in every summary, the compact network, and the budget study
(issue 12): declared passes match the backward passes a step runs; train.budget decides epochs;
summary.json says which commit, versions, hardware, passes and budget made it; tables refuse to
mix commits; the study's spec is checked and its report built from its runs."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from atcd_ray.config import ConfigError, load_config
from atcd_ray.core.methods import METHODS
from atcd_ray.core.models import build_model
from atcd_ray.report import check_one_commit
from atcd_ray.report import main as report_main
from atcd_ray.report import budget_study_report
from atcd_ray.budget import cell_dir, load_budget_study
from atcd_ray.provenance import provenance

from .test_distributed import _env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method, options, passes", [
    ("natural", {}, 1), ("fast", {}, 2), ("nfgsm", {}, 2), ("free", {"replays": 3}, 3), ("pgd", {"steps": 4}, 5),
    ("trades", {"steps": 4}, 5), ("yopo", {"m": 3, "n": 2}, 3), ("trades-yopo", {"m": 3, "n": 2}, 4),
    ("atcd", {"T": 2, "K": 3}, 8), ("atcd", {"T": 2, "K": 3, "reuse_grad": True}, 6),
])
def test_declared_passes(method, options, passes):
    assert METHODS[method].passes(METHODS[method].Options(**options)) == passes


@pytest.mark.parametrize("method, options", [
    ("natural", {}), ("fast", {}), ("nfgsm", {}), ("free", {"replays": 3}), ("pgd", {"steps": 4}),
    ("atcd", {"T": 2, "K": 3, "mh": False}), ("atcd", {"T": 3, "K": 2, "mh": False, "reuse_grad": True}),
    ("atcd", {"T": 2, "K": 2, "mh": False, "order": "drift_kick", "kick": "gradient", "init": "carry_delta"}),
])
def test_declared_passes_are_the_backward_passes_a_step_runs(method, options, random_batch):
    """Counted by a hook on the network's last layer: one call per backward through the network.
    (TRADES' training pass runs two forwards through one loss, YOPO its first layer alone, and
    ATCD's M-H re-runs rejected rows: their conventions are the declared ones above.)"""
    torch.manual_seed(0)
    model = build_model("compactcnn", 10, 1)
    opts = METHODS[method].Options(**options)
    runner = METHODS[method](model, torch.optim.SGD(model.parameters(), lr=0.01), 0.1, opts)
    x, y = random_batch[0][:, :, :12, :12], random_batch[1]
    x = torch.nn.functional.interpolate(x, size=28)
    runner.step(x, y)  # ATCD with reuse_grad: the first minibatch of a fresh chain has one replay less
    calls = []
    handle = model.net.classifier.fc2.register_full_backward_hook(lambda *_: calls.append(1))
    runner.step(x, y)
    handle.remove()
    assert len(calls) == METHODS[method].passes(opts)


def test_budget_decides_epochs_the_last_one_a_fraction():
    """budget / passes epochs: whole where the passes divide the budget, else the last one begun
    and cut (T 4 K 2 is 12 passes, 8 with reuse_grad; T 4 K 1 with reuse_grad 4)."""
    cases = [("natural", [], 12, 12), ("fast", [], 6, 6), ("pgd", [("methods.pgd.steps", 3)], 3, 3),
             ("free", [("methods.free.replays", 5)], 3, 2.4),
             ("atcd", [("methods.atcd.T", 2), ("methods.atcd.K", 2), ("methods.atcd.reuse_grad", False)], 2, 2),
             ("atcd", [("methods.atcd.T", 2), ("methods.atcd.K", 2), ("methods.atcd.reuse_grad", True)], 3, 3),
             ("atcd", [("methods.atcd.T", 4), ("methods.atcd.K", 2), ("methods.atcd.reuse_grad", True)], 2, 1.5),
             ("pgd", [("methods.pgd.steps", 10)], 2, 12 / 11)]
    for method, overrides, epochs, fractional in cases:
        cfg = load_config("fashion-mnist", overrides=[("train.method", method), ("train.budget", 12), *overrides])
        assert (cfg.train.epochs, cfg.epochs_to_train) == (epochs, pytest.approx(fractional)), method
    cfg = load_config("fashion-mnist", overrides=[("train.method", "pgd"), ("methods.pgd.steps", 10), ("train.budget", 4)])
    assert (cfg.train.epochs, cfg.epochs_to_train) == (1, pytest.approx(4 / 11))  # less than an epoch: a part of one
    with pytest.raises(ConfigError, match="budget must be > 0"):
        load_config("fashion-mnist", overrides=[("train.budget", 0)])


def test_compact_network_is_several_times_cheaper_than_smallcnn():
    def multiply_adds(name):
        model, total = build_model(name, 10, 1), []

        def count(module, inputs, output):
            weight = module.weight
            conv = isinstance(module, torch.nn.Conv2d)
            total.append(output[0].numel() * weight[0].numel() if conv else weight.numel())
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.register_forward_hook(count)
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)
        return sum(total)

    compact, small = multiply_adds("compactcnn"), multiply_adds("smallcnn")
    assert 2.0e6 < compact < 2.2e6 and 9.5e6 < small < 10.5e6  # the figures its docstring gives
    assert small / compact > 4


def test_provenance_names_the_commit_and_sees_edits(tmp_path):
    clone = tmp_path / "clone"  # a checkout of one commit (a clone of this one took 17 s: its results/)
    clone.mkdir()
    (clone / "README.md").write_text("a checkout\n")
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    for step in (["init", "-q"], ["add", "README.md"], ["commit", "-q", "-m", "one commit"]):
        subprocess.run([*git, *step], check=True, timeout=60)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    clean = provenance(clone)
    assert clean["commit"] == head and clean["dirty"] is False
    assert torch.__version__.startswith(clean["versions"]["torch"])
    (clone / "README.md").write_text("edited\n")
    assert provenance(clone)["dirty"] is True  # positive control: an edit to a tracked file shows
    (tmp_path / "image").mkdir()
    assert provenance(tmp_path / "image")["commit"] is None  # no checkout, no variable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATCD_RAY_COMMIT", "abc123")
        assert provenance(tmp_path / "image")["commit"] == "abc123"


def test_summary_records_commit_versions_hardware_passes_and_budget(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "atcd_ray.train", "digits", "--method", "fast", "--workers", "0",
                    "--out", str(out), "--eval-n", "32", "--quiet", "--set", "model=compactcnn",
                    "--set", "train.budget=5", "--set", "train.val_n=32", "--set", "eval.attacks=[pgd5]",
                    "--set", "methods.fast.early_stop=false"],
                   check=True, env=_env(), timeout=300, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert summary["provenance"]["commit"] == head and isinstance(summary["provenance"]["dirty"], bool)
    versions = summary["provenance"]["versions"]
    assert versions["ray"] and versions["torch"] and versions["python"].startswith("3.")
    assert summary["hardware"]["cpu_count"] >= 1 and summary["hardware"]["cpu"]
    if Path("/proc/cpuinfo").exists():  # the CPU's generation, which a VM's model name hides
        assert re.fullmatch(r"\S+ family \d+ model \d+ stepping \d+", summary["hardware"]["cpu_id"])
    # Budget 5 at 2 passes a minibatch: two epochs and half of a third, the whole budget spent.
    assert summary["passes_per_minibatch"] == 2 and summary["epochs"] == 3 and summary["budget"] == 5
    assert summary["train_examples"] == 1100  # the digits' training split, val held out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["budget_spent"] for h in history] == [2, 4, 5]


def _summary(commit, dirty=False, **fields):
    return {"provenance": {"commit": commit, "dirty": dirty}, **fields}


def test_tables_refuse_runs_of_different_commits(tmp_path):
    same = [_summary("a" * 40), _summary("a" * 40)]
    assert check_one_commit(same, allow_mixed=False) is None
    mixed = [_summary("a" * 40), _summary("a" * 40, dirty=True), {"method": "old run"}]
    with pytest.raises(ConfigError, match=r"commits: aaaaaaaaaa \(1\); aaaaaaaaaa\+dirty \(1\); unknown \(1\)"):
        check_one_commit(mixed, allow_mixed=False)
    assert check_one_commit(mixed, allow_mixed=True) == ["aaaaaaaaaa", "aaaaaaaaaa+dirty", "unknown"]
    paths = []
    for i, commit in enumerate(["a" * 40, "b" * 40]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(_summary(commit, method=["natural", "fast"][i], epochs=1, clean_acc=0.9,
                                                 robust_acc={"pgd20": 0.5}, train_seconds=10.0)))
    script = [sys.executable, str(ROOT / "benchmarks" / "summaries_table.py"), *map(str, paths)]
    refused = subprocess.run(script, capture_output=True, text=True, env=_env())
    assert refused.returncode == 2 and "different commits" in refused.stderr and not refused.stdout
    marked = subprocess.run([*script, "--allow-mixed-commits"], capture_output=True, text=True, env=_env(), check=True)
    assert "| natural (aaaaaaaaaa) |" in marked.stdout and "| fast (bbbbbbbbbb) |" in marked.stdout


SPEC = {
    "study": "tiny", "dataset": "digits", "models": ["compactcnn"], "budgets": [2, 4], "trials": 2,
    "search": {"train.val_n": 64, "eval.n": 64, "eval.attacks": ["pgd5"]},
    "common": {"optim.lr": {"loguniform": [0.01, 0.3]}},
    "methods": {"fast": {"methods.fast.alpha_factor": {"uniform": [0.75, 1.5]}}},
    "final": {"eval.attacks": ["pgd20"], "eval.n": 64}, "final_seeds": [1, 2], "autoattack_n": [0, 16],
}


def _spec_file(tmp_path, **changes):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


def test_the_repository_study_spec_is_valid():
    spec = load_budget_study(ROOT / "tune_spaces" / "fashion-mnist_budget.yaml")
    assert set(spec.methods) == {"pgd", "free", "fast", "trades", "atcd"} and spec.reference == "natural"
    assert spec.trials >= 6 and len(spec.budgets) >= 2 and spec.models == ["compactcnn", "smallcnn"]
    for model, budget, _ in spec.cells():  # every method's every trial spends the budget exactly
        for method in spec.methods:
            study = spec.search_space(model, budget, method)
            for name, choice in study.params.items():
                if "choice" in choice and isinstance(choice["choice"][0], dict) or name.endswith(("steps", "replays")):
                    values = choice["choice"]
                    for value in values:
                        cfg = study.config(list(value.items()) if isinstance(value, dict) else [(name, value)])
                        assert cfg.train.epochs * cfg.passes_per_minibatch == budget, (method, value)


def test_the_fair_study_searches_every_method_alike_with_its_published_setting_first():
    spec = load_budget_study(ROOT / "tune_spaces" / "fashion-mnist_fair.yaml")
    assert set(spec.methods) == {"pgd", "trades", "free", "fast", "nfgsm", "atcd"} and spec.reference == "natural"
    assert spec.budgets == [12, 24, 48] and spec.trials >= 16 and spec.searcher == "tpe"
    assert min(spec.final_seeds) >= 5 and spec.autoattack_n[spec.budgets.index(48)] == 1000
    assert set(spec.points_to_evaluate) == set(spec.methods)  # each method's published setting, its first trial
    (paper,) = spec.points_to_evaluate["atcd"]
    assert paper["T, K"] == {"methods.atcd.T": 4, "methods.atcd.K": 2} and paper["methods.atcd.lam"] == 2.0
    assert paper["methods.atcd.alpha"] == paper["methods.atcd.eta"] == 0.1 == load_config(
        "fashion-mnist", ROOT / spec.recipe).eps and paper["methods.atcd.tau"] == paper["methods.atcd.kappa"] == 1.0
    assert spec.methods["atcd"]["methods.atcd.lam"]["loguniform"][0] >= 1.0  # lam / rho >= 1 (rho stays 1)
    for model, budget, _ in spec.cells():
        study = spec.search_space(model, budget, "atcd")
        cfg = study.config(study.trial_overrides(study.tune_points()[0])[len(study.fixed):])
        assert (cfg.methods["atcd"].T, cfg.methods["atcd"].K, cfg.methods["atcd"].rho) == (4, 2, 1.0)
        assert cfg.train.val_n >= 2000 and cfg.data.subset == 10000


@pytest.mark.parametrize("changes, message", [
    ({"colour": 1}, "colour: unknown key"),
    ({"budgets": [4, 2]}, "budgets: increasing positive numbers"),
    ({"final_seeds": [1]}, "final_seeds: one integer >= 0 per budget"),
    ({"models": ["resnet9"]}, "models: each one of"),
    ({"methods": {"natural": {}}}, "methods: a mapping of searched methods"),
    ({"final": {"eval.attacks": ["pgd5"]}}, "final: eval.attacks must include pgd20"),
    ({"trials": 0}, "trials: an integer >= 1"),
    ({"final": {"eval.attacks": ["pgd20"], "optim.lr": 0.1}}, "final: optim.lr is searched"),
    ({"ema": {"decay": 0.999, "budgets": [48], "top": 1}}, "ema: {decay"),
    ({"ema": {"decay": 1.0, "budgets": [4], "top": 1}}, "ema: {decay"),
    ({"ema": {"decay": 0.999, "budgets": [4], "top": 2}}, "ema: {decay"),  # one searched method
])
def test_bad_study_specs_are_refused_with_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_budget_study(_spec_file(tmp_path, **changes))


def _write_final(directory, budget, method, seed, commit, clean, pgd20, seconds, aa=None, cpu_id=None):
    run = directory / "final" / "compactcnn" / f"budget{budget}" / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "provenance": {"commit": commit, "dirty": False, "versions": {"torch": "2.14.1"}},
        "hardware": {"cpu": "AMD EPYC", "cpu_count": 2, "cpu_id": cpu_id}, "train_examples": 1100, "eval_n": 597,
        "passes_per_minibatch": 2 if method == "fast" else 1, "epochs": 1, "train_seconds": seconds, "seed": seed,
        "clean_acc": clean, "robust_acc": {"pgd20": pgd20}}))
    if aa is not None:
        (run / "autoattack.json").write_text(json.dumps({"n": 16, "robust_acc": {"autoattack": aa, "pgd20": pgd20},
                                                          "provenance": {"commit": commit, "dirty": False}}))


def test_study_report_tables_time_to_target_and_refuses_mixed_commits(tmp_path):
    directory = tmp_path / "study"
    directory.mkdir()
    spec = load_budget_study(_spec_file(tmp_path))
    (directory / "budget_study.json").write_text(json.dumps(spec.recorded()))
    (directory / "winners.json").write_text(json.dumps({"compactcnn/budget4/fast": {"params": {"optim.lr": 0.05}}}))
    _write_final(directory, 2, "natural", 0, "c" * 40, 0.95, 0.01, 5.0)
    _write_final(directory, 4, "natural", 0, "c" * 40, 0.96, 0.02, 10.0, aa=0.0)
    _write_final(directory, 4, "natural", 1, "c" * 40, 0.96, 0.02, 12.0, aa=0.0)
    _write_final(directory, 2, "fast", 0, "c" * 40, 0.86, 0.70, 9.0)  # misses the 74% target
    _write_final(directory, 4, "fast", 0, "c" * 40, 0.88, 0.76, 20.0, aa=0.74)
    _write_final(directory, 4, "fast", 1, "c" * 40, 0.86, 0.74, 22.0, aa=0.72)
    report_main([str(directory)])
    text = (directory / "report" / "report.md").read_text()
    assert "| fast | compactcnn | 4 | 21 | 87.00% | 75.00% |" in text  # the mean over two seeds reaches it
    assert "| natural | compactcnn" not in text.split("## Winners")[0]  # natural never reaches 74%
    # Means with their 95% t intervals over the two seeds: t(0.975, 1) = 12.706, sd = 0.01 * sqrt(2)
    assert "| compactcnn | 4 | fast | lr=0.05 | 2 | 1 | 2 | 21 | 87.00 ± 12.71 | 75.00 ± 12.71 |  | 73.00 ± 12.71 | " \
           "75.00 ± 12.71 | 16 | 2 |" in text
    assert (directory / "report" / "budget_compactcnn.png").stat().st_size > 10_000
    _write_final(directory, 2, "fast", 1, "d" * 40, 0.86, 0.70, 9.0)
    with pytest.raises(ConfigError, match="different commits"):
        budget_study_report(directory, directory / "report")
    budget_study_report(directory, directory / "report", allow_mixed=True)
    assert "cccccccccc, dddddddddd |" in (directory / "report" / "report.md").read_text()
    # Seconds from another CPU generation do not compare: refused, or each row names its machine.
    _write_final(directory, 4, "natural", 2, "c" * 40, 0.96, 0.02, 8.0, cpu_id="AuthenticAMD family 26 model 2")
    with pytest.raises(ConfigError, match="timed on different machines"):
        budget_study_report(directory, directory / "report", allow_mixed=True)
    budget_study_report(directory, directory / "report", allow_mixed=True, allow_mixed_machines=True)
    text = (directory / "report" / "report.md").read_text()
    assert "| AMD EPYC, AuthenticAMD family 26 model 2, 2 cores; AMD EPYC, generation not recorded, 2 cores |" in text


@pytest.mark.timeout(900)
def test_study_runs_search_and_finals_through_ray_and_resumes(tmp_path, shared_ray):
    """The whole driver on the digits: a 2-trial Ray Tune search of Fast-FGSM at one budget,
    the winner and the natural reference retrained, then AutoAttack on 16 images of each; a rerun
    redoes nothing; a rerun from the record alone (another machine) trains nothing again."""
    spec = _spec_file(tmp_path, budgets=[2], final_seeds=[1], autoattack_n=[16], search_seed=11)
    out = tmp_path / "study"
    command = [sys.executable, "-m", "atcd_ray.study", str(spec), "--out", str(out),
               "--record", str(tmp_path / "record")]
    subprocess.run(command, check=True, env=_env(shared_ray), timeout=900, capture_output=True)
    trials = list((out / "search" / "compactcnn" / "budget2" / "fast" / "runs").glob("*/summary.json"))
    assert len(trials) == 2
    assert json.loads((out / "search/compactcnn/budget2/fast/searcher.json").read_text())["search_seed"] == 11
    for path in trials:
        summary = json.loads(path.read_text())
        assert summary["budget"] == 2 and summary["train_examples"] == 1100
    winners = json.loads((out / "winners.json").read_text())
    best = max(trials, key=lambda p: json.loads(p.read_text())["final_epoch"]["val_robust_acc"])
    assert winners["compactcnn/budget2/fast"]["trial_id"] == best.parent.name
    finals = {m: out / "final" / "compactcnn" / "budget2" / m / "seed0" for m in ("natural", "fast")}
    for method, run in finals.items():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["method"] == method and summary["budget"] == 2 and summary["eval_n"] == 64
        assert json.loads((run / "autoattack.json").read_text())["n"] == 16
    # Every training ran before the first AutoAttack, so that no evaluation ran beside a run timed
    trained = max((run / "summary.json").stat().st_mtime_ns for run in finals.values())
    assert trained < min((run / "autoattack.json").stat().st_mtime_ns for run in finals.values())
    lr = dict(map(tuple, winners["compactcnn/budget2/fast"]["overrides"]))["optim.lr"]
    assert json.loads((finals["fast"] / "summary.json").read_text())["config"]["optim"]["lr"] == lr
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name in ("summary.json", "autoattack.json")}
    rerun = subprocess.run(command, check=True, env=_env(shared_ray), timeout=300, capture_output=True, text=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, rerun.stderr[-2000:]

    # The record: no trial's files, each final run as its summary and a weights-only checkpoint.
    record = tmp_path / "record"
    assert not list(record.rglob("runs")) and (record / "search/compactcnn/budget2/fast/done.json").exists()
    for method, run in finals.items():
        kept = record / run.relative_to(out)
        summary = json.loads((kept / "summary.json").read_text())
        assert summary["checkpoint"] == "weights.safetensors" and summary["recorded_from"]
        assert (kept / "autoattack.json").read_bytes() == (run / "autoattack.json").read_bytes()
    # Another machine holds the record only (and one AutoAttack result is missing): the study
    # resumes from it, trains nothing, and AutoAttack on the recorded weights gives the same result.
    aa_kept = record / finals["fast"].relative_to(out) / "autoattack.json"
    first = json.loads(aa_kept.read_text())
    aa_kept.unlink()
    shutil.rmtree(out)
    elsewhere = subprocess.run(command, check=True, env=_env(shared_ray), timeout=600, capture_output=True, text=True)
    assert not list(out.rglob("runs")) and not list(out.rglob("metrics.jsonl")), elsewhere.stderr[-2000:]
    assert not list(out.rglob("last.safetensors"))
    again = json.loads(aa_kept.read_text())
    assert (again["clean_acc"], again["robust_acc"]) == (first["clean_acc"], first["robust_acc"])
    assert json.loads((finals["natural"] / "autoattack.json").read_text()) == \
        json.loads((record / finals["natural"].relative_to(out) / "autoattack.json").read_text())
    (tmp_path / "record-report").mkdir()
    budget_study_report(record, tmp_path / "record-report")
    assert "| fast |" in (tmp_path / "record-report" / "report.md").read_text()


def test_the_winner_is_the_best_completed_trial_never_a_diverged_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from atcd_ray.budget import winner

    spec = load_budget_study(_spec_file(tmp_path))
    sweep = tmp_path / "study" / "search" / "compactcnn" / "budget2" / "fast"
    sweep.mkdir(parents=True)
    rows = [("t0", 0.2, 1.0, "completed", 0.30), ("t1", 0.1, 1.2, "diverged", 0.50),  # reported 0.5, then NaN
            ("t2", 0.05, 0.9, "completed", 0.35), ("t3", 0.3, 1.4, "stopped", None)]
    pq.write_table(pa.table({"trial_id": [r[0] for r in rows], "optim.lr": [r[1] for r in rows],
                             "methods.fast.alpha_factor": [r[2] for r in rows], "status": [r[3] for r in rows],
                             "objective": [r[4] for r in rows]}), sweep / "results.parquet")
    with pytest.raises(ConfigError, match="has not finished"):
        winner(spec, tmp_path / "study", model="compactcnn", budget=2, method="fast")
    (sweep / "done.json").write_text(json.dumps({"trials": spec.trials - 1}))  # an interrupted sweep's count
    with pytest.raises(ConfigError, match="has not finished"):
        winner(spec, tmp_path / "study", model="compactcnn", budget=2, method="fast")
    (sweep / "done.json").write_text(json.dumps({"trials": spec.trials}))
    best = winner(spec, tmp_path / "study", model="compactcnn", budget=2, method="fast")
    assert best["trial_id"] == "t2" and best["overrides"] == [("optim.lr", 0.05), ("methods.fast.alpha_factor", 0.9)]


def test_weights_only_copy_holds_the_model_and_config_and_loads(tmp_path):
    from atcd_ray import load_model
    from atcd_ray.core.checkpoint import Checkpoint, save_checkpoint, save_weights_only

    cfg = load_config("fashion-mnist", overrides=[("model", "compactcnn")])
    model = build_model("compactcnn", in_channels=1, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # momentum buffers: optimizer state as large as the model
    full = save_checkpoint(tmp_path / "last.safetensors", model, config=cfg.to_dict(), meta={"epoch": 3},
                           optimizer=optimizer, rng_state=torch.get_rng_state())
    slim = save_weights_only(full, tmp_path / "weights.safetensors")
    original, copy = Checkpoint(full), Checkpoint(slim)
    assert copy.config == original.config and copy.meta == original.meta
    assert set(copy.tensors) == {k for k in original.tensors if k.startswith("model.")}
    assert slim.stat().st_size < 0.6 * full.stat().st_size
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(load_model(slim)(x), load_model(full)(x))


def test_gpu_autoattack_stages_runs_evaluates_them_alone_and_collects(tmp_path, monkeypatch):
    """scripts/gpu_autoattack.py and --stage autoattack, as on a GPU machine without Ray: the
    staged runs are weights-only copies; the stage evaluates each run lacking autoattack.json,
    `--jobs` at a time, on the staged test files alone; collect brings each result back, naming
    the checkpoint it was copied from."""
    import importlib.util

    from atcd_ray import budget, evaluate, study
    from atcd_ray.core.checkpoint import save_checkpoint

    loaded = importlib.util.spec_from_file_location("gpu_autoattack", ROOT / "scripts" / "gpu_autoattack.py")
    gpu_autoattack = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(gpu_autoattack)
    spec_file = _spec_file(tmp_path, dataset="fashion-mnist", budgets=[2], final_seeds=[1], autoattack_n=[8])
    spec = load_budget_study(spec_file)
    out = tmp_path / "study"
    out.mkdir()
    (out / "budget_study.json").write_text(json.dumps(spec.recorded(), indent=2) + "\n")
    cfg = load_config("fashion-mnist", overrides=[("model", "compactcnn")])
    for method in ("natural", "fast"):
        run = out / "final" / "compactcnn" / "budget2" / method / "seed0"
        run.mkdir(parents=True)
        torch.manual_seed(len(method))
        save_checkpoint(run / "last.safetensors", build_model("compactcnn", in_channels=1, num_classes=10),
                        config=cfg.to_dict())
        (run / "summary.json").write_text(json.dumps({"checkpoint": "last.safetensors", "method": method}))
    (out / "final" / "compactcnn" / "budget2" / "natural" / "seed0" / "autoattack.json").write_text("{}")
    staged = tmp_path / "stage"
    assert gpu_autoattack.main(["stage", str(out), str(staged)]) == 0
    assert sorted(p.parent.parent.name for p in staged.glob("final/*/*/*/seed0/weights.safetensors")) == ["fast"]
    assert sorted(p.name for p in (staged / "data").iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                                    "t10k-labels-idx1-ubyte.gz"]

    # The GPU machine, played on the CPU: study passes --gpu (CUDA is there), and the evaluation
    # runs in this process (with this machine's packages, not the staged copies).
    commands = []

    def evaluate_here(module, *args):
        assert module == "atcd_ray.evaluate" and "--gpu" in args and "--workers" not in args
        commands.append(args)
        assert evaluate.main([a for a in args if a != "--gpu"] + ["--workers", "0"]) == 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(budget, "_python", evaluate_here)
    study.main([str(spec_file), "--stage", "autoattack", "--out", str(staged), "--jobs", "2",
                "--data-dir", str(staged / "data")])
    assert len(commands) == 1 and commands[0][commands[0].index("--eval-n") + 1] == "8"
    result = json.loads((staged / "final/compactcnn/budget2/fast/seed0/autoattack.json").read_text())
    assert result["n"] == 8 and set(result["robust_acc"]) == {"pgd20", "autoattack"}

    assert gpu_autoattack.main(["collect", str(staged), str(out)]) == 0
    back = json.loads((out / "final/compactcnn/budget2/fast/seed0/autoattack.json").read_text())
    source = out / "final/compactcnn/budget2/fast/seed0/last.safetensors"
    assert back["evaluated_copy_of"] == {"checkpoint": str(source.resolve()), "sha256": evaluate.file_sha256(source)}
    assert back["correct"] == result["correct"] and back["device_provenance"] == result["provenance"]
    assert back["provenance"]["commit"] == provenance()["commit"]  # the staged tree's, not the device's
    with pytest.raises(SystemExit, match="exists; not replaced"):
        gpu_autoattack.main(["collect", str(staged), str(out)])
    (out / "final/compactcnn/budget2/fast/seed0/autoattack.json").unlink()
    torch.manual_seed(99)  # the run trained again since it was staged: its result is not this one
    save_checkpoint(source, build_model("compactcnn", in_channels=1, num_classes=10), config=cfg.to_dict())
    with pytest.raises(SystemExit, match="is not the checkpoint that was staged"):
        gpu_autoattack.main(["collect", str(staged), str(out)])
    assert not (out / "final/compactcnn/budget2/fast/seed0/autoattack.json").exists()


def test_train_cli_epochs_replace_a_recipes_budget_and_budget_sets_epochs(tmp_path):
    from atcd_ray.train import overrides_from, parser

    tree = yaml.safe_load((ROOT / "pipelines" / "fashion-mnist_smallcnn.yaml").read_text())
    tree["train"]["budget"] = 12
    recipe = tmp_path / "budget.yaml"
    recipe.write_text(yaml.safe_dump(tree))

    def config(*flags):
        args = parser().parse_args(["fashion-mnist", "--recipe", str(recipe), "--method", "fast", *flags])
        return load_config(args.dataset, args.recipe, overrides_from(args)).train

    assert (config().budget, config().epochs) == (12, 6)  # Fast-FGSM: 2 passes a minibatch
    assert (config("--epochs", "7").budget, config("--epochs", "7").epochs) == (None, 7)  # not 6: the flag wins
    assert config("--budget", "4").epochs == 2
    with pytest.raises(ConfigError, match="not both"):
        config("--epochs", "7", "--budget", "4")


# CompactCNN's recipe holds the fair study's winners; SmallCNN's, which the fair study did not
# search, still holds the superseded budget study's (docs/RESULTS.md).
@pytest.mark.parametrize("model, study", [("compactcnn", "fashion-mnist_fair"), ("smallcnn", "fashion-mnist_budget")])
def test_the_fashion_mnist_recipes_hold_their_studys_winners(model, study, monkeypatch):
    """pipelines/fashion-mnist_<model>.yaml is its study's budget-12 winners on that network (under
    the fair study's stability rule: the set-aside winners' replacements), as the study's record
    (results/<its name>, in the repository) has them: each method's config from the recipe equals
    the study's final run of that method (the same training, bit for bit). The study itself reads
    its pinned base (tune_spaces/), not these recipes."""
    from atcd_ray.budget import final_overrides, set_aside_trials, winner

    monkeypatch.chdir(ROOT)  # the study's paths, as its command's, are the repository root's
    spec = load_budget_study(Path(f"tune_spaces/{study}.yaml"))
    assert Path(spec.recipe).parent.name == "tune_spaces" and model in spec.models
    record = Path("results") / spec.study
    for method in spec.methods:
        aside = set_aside_trials(record, model=model, budget=12, method=method)
        chosen = winner(spec, record, model=model, budget=12, method=method, passed_over=aside)
        overrides = final_overrides(spec, model, 12, method, knobs=chosen["overrides"], seed_index=0)
        final = load_config(spec.dataset, spec.recipe, overrides).to_dict()
        recipe = load_config(recipe=ROOT / "pipelines" / f"fashion-mnist_{model}.yaml",
                             overrides=[("train.method", method)]).to_dict()
        for key in ("model", "seed", "optim", "data", "eps"):
            assert recipe[key] == final[key], (method, key)
        assert recipe["train"]["budget"] == final["train"]["budget"] == 12
        assert recipe["train"]["epochs"] == final["train"]["epochs"]
        assert recipe["methods"][method] == final["methods"][method], method
        # ... and the study's final run of seed 0 trained that config (the budget study's predate
        # some options: those, at values that train as before, are not in its runs' configs)
        trained = json.loads((cell_dir(record, "final", model=model, budget=12, method=method) / "seed0" /
                              "summary.json").read_text())["config"]
        options = recipe["methods"][method]
        assert trained["methods"][method] == {k: options[k] for k in trained["methods"][method]}, method
        assert trained["optim"] == recipe["optim"], method


def test_the_records_final_runs_trained_the_configs_the_study_builds(monkeypatch):
    """Each final run in the record trained exactly the config that the spec, its pinned base and
    the recorded search give today: neither file may drift from the record (positive control: the
    same run's config with the next seed differs)."""
    from atcd_ray.budget import final_overrides, final_runs, winner
    from atcd_ray.run_dir import UNSET_KEYS

    def used(config):  # the selected method's options only: the other methods' are not used
        config = {**config, "methods": config["methods"][config["train"]["method"]]}
        config.pop("per_method")
        # Keys added later, at the value that trains as before they existed (run_dir.UNSET_KEYS)
        config["train"] = {k: v for k, v in config["train"].items() if (k, v) not in UNSET_KEYS}
        return config

    monkeypatch.chdir(ROOT)
    spec = load_budget_study(Path("tune_spaces/fashion-mnist_budget.yaml"))
    record = Path("results/fashion-mnist-budget")
    assert json.loads((record / "budget_study.json").read_text()) == spec.recorded()
    runs = final_runs(spec, record)
    for run, _ in runs:
        model, budget, method, seed = run.parts[-4], float(run.parts[-3][6:]), run.parts[-2], int(run.parts[-1][4:])
        knobs = [] if method == spec.reference else winner(spec, record, model=model, budget=budget,
                                                           method=method)["overrides"]

        def built(seed_index):
            overrides = final_overrides(spec, model, budget, method, knobs=knobs, seed_index=seed_index)
            return used(load_config(spec.dataset, spec.recipe, overrides).to_dict())

        trained = used(json.loads((run / "summary.json").read_text())["config"])
        options = METHODS[method].Options()
        # Options added since (ATCD's readings), at their defaults, are what the record trained.
        added = {k for k in built(seed)["methods"] if k not in trained["methods"]}
        assert all(built(seed)["methods"][k] == getattr(options, k) for k in added), added
        trained["methods"].update({k: getattr(options, k) for k in added})
        assert built(seed) == trained, run
        assert built(seed + 1) != trained
    assert len(runs) == 36


def test_the_last_epoch_of_a_budget_stops_part_way_where_the_schedule_ends(tmp_path, monkeypatch):
    """Budget 2.5 at 1 pass a minibatch: epochs 1 and 2 whole, epoch 3 its first half; the cosine
    schedule is laid over 2.5 epochs, so its last step's learning rate is near 0."""
    from atcd_ray import trainer

    lrs = []
    real_lr = trainer.learning_rate

    def spy(*args, **kwargs):
        lrs.append(real_lr(*args, **kwargs))
        return lrs[-1]

    monkeypatch.setattr(trainer, "learning_rate", spy)
    cfg = load_config("digits", overrides=[("train.method", "natural"), ("train.budget", 2.5), ("data.batch_size", 100),
                                           ("optim.schedule", "cosine"), ("eval.n", 32), ("train.val_n", 32),
                                           ("eval.attacks", ["fgsm"]), ("train.val_attack", "fgsm")])
    summary = trainer.fit(cfg, tmp_path / "run", progress=False)
    per_epoch = 11  # 1,100 training digits in minibatches of 100
    assert len(lrs) == 2 * per_epoch + round(0.5 * per_epoch)
    assert lrs[-1] == pytest.approx(cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * (2 + 5 / 11) / 2.5)))
    assert lrs[-1] < 0.02 * cfg.optim.lr
    assert summary["epochs"] == 3 and summary["budget"] == 2.5


def test_a_mean_interval_is_students_t_and_paired_differences_give_a_verdict():
    from atcd_ray.report import mean_interval, paired_differences

    mean, half = mean_interval([0.70, 0.72, 0.74, 0.71, 0.73])  # sd 0.0158, t(0.975, 4) = 2.776
    assert mean == pytest.approx(0.72) and half == pytest.approx(2.7764 * 0.015811 / 5 ** 0.5, rel=1e-3)
    assert mean_interval([0.7]) == (0.7, None) and mean_interval([]) == (None, None)

    def row(method, pgd20, budget="48"):  # five seeds, 10..14
        return {"network": "compactcnn", "budget": budget, "method": method, "pgd20": sum(pgd20) / 5,
                "_by_seed": {"pgd20": dict(zip(range(10, 15), pgd20)), "clean": {}, "autoattack": {}}}

    free = [0.70, 0.72, 0.74, 0.71, 0.73]
    cases = {"wins": [v + 0.02 for v in free], "ties": [0.70, 0.74, 0.72, 0.73, 0.71], "loses": [v - 0.02 for v in free]}
    for verdict, atcd in cases.items():
        finals = [row("natural", [0.9] * 5), row("free", free), row("fast", [0.6] * 5), row("atcd", atcd),
                  row("free+ema", [0.99] * 5)]  # neither the reference nor a weight-averaged variant is "best other"
        (contest,) = paired_differences(finals, challenger="atcd", reference="natural")
        assert contest["best other"] == "free" and contest["pgd20 difference"].endswith(f"(5 seeds): {verdict}")
        # Against each: the same row for the best, then the rest by mean PGD-20 (fast: 0.6 on every seed).
        best, fast = paired_differences(finals, challenger="atcd", reference="natural", every=True)
        assert best == {**{k: v for k, v in contest.items() if k != "best other"}, "method": "atcd", "against": "free"}
        assert fast["against"] == "fast" and fast["pgd20 difference"].endswith("(5 seeds): wins")
    # A variant is paired with the others' same variant only: atcd+ema against free+ema (0.99 on every seed).
    finals.append(row("atcd+ema", [0.98] * 5))
    *_, averaged = paired_differences(finals, challenger="atcd", reference="natural", every=True)
    assert (averaged["method"], averaged["against"]) == ("atcd+ema", "free+ema")
    assert averaged["pgd20 difference"] == "-1.00 ± 0.00 (5 seeds): loses"
    # The pairing is by seed: the same values, shuffled across seeds, no longer tie exactly.
    finals = [row("free", free), row("atcd", free[::-1])]
    (contest,) = paired_differences(finals, challenger="atcd", reference="natural")
    assert contest["pgd20 difference"].startswith("+0.00 ± ") and not contest["pgd20 difference"].startswith(
        "+0.00 ± 0.00")


def test_the_weight_averaged_finals_are_the_best_methods_and_get_rows_of_their_own(tmp_path):
    from atcd_ray.budget import ema_choice

    spec = load_budget_study(_spec_file(tmp_path, methods={
        "fast": {"methods.fast.alpha_factor": {"uniform": [0.75, 1.5]}},
        "free": {"methods.free.replays": {"choice": [2, 4]}}, "pgd": {"methods.pgd.steps": {"choice": [1, 3]}}},
        ema={"decay": 0.99, "budgets": [4], "top": 2}))
    directory = tmp_path / "study"
    for method, pgd20 in (("fast", 0.70), ("free", 0.74), ("pgd", 0.72)):
        for seed in (0, 1):
            _write_final(directory, 4, method, seed, "c" * 40, 0.85, pgd20 + seed / 100, 10.0)
    assert ema_choice(spec, directory, model="compactcnn", budget=4) == ["free", "pgd"]
    for seed in (0, 1):
        _write_final(directory, 4, "free+ema", seed, "c" * 40, 0.86, 0.76, 10.0)
    (directory / "budget_study.json").write_text(json.dumps(spec.recorded()))
    (directory / "report").mkdir()
    budget_study_report(directory, directory / "report")
    assert "| compactcnn | 4 | free+ema | recipe |" in (directory / "report" / "report.md").read_text()


def test_a_begun_study_may_change_its_final_stage_keys_only(tmp_path):
    from atcd_ray.study import check_same_study

    recorded = tmp_path / "budget_study.json"
    recorded.write_text(json.dumps(load_budget_study(_spec_file(tmp_path)).recorded()))
    more_seeds = load_budget_study(_spec_file(tmp_path, final_seeds=[3, 5], ema={"decay": 0.99, "budgets": [4],
                                                                                   "top": 1}))
    check_same_study(recorded, more_seeds, "refused")
    with pytest.raises(ConfigError, match="refused"):
        check_same_study(recorded, load_budget_study(_spec_file(tmp_path, trials=3)), "refused")


def test_finals_train_jobs_at_a_time_each_on_its_share_of_the_cores(tmp_path, monkeypatch):
    import threading
    import time

    from atcd_ray import budget

    spec = load_budget_study(_spec_file(tmp_path))
    monkeypatch.setattr(budget, "winner", lambda *args, **kwargs: {"overrides": [], "params": {}})
    monkeypatch.setattr(budget, "run_autoattack", lambda *args, **kwargs: None)
    monkeypatch.setattr(budget.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    lock, running, peak, threads = threading.Lock(), [0], [0], []

    def train(module, *args, env=None):  # a final run: a summary after a while
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        run = Path(args[args.index("--out") + 1])
        run.mkdir(parents=True)
        (run / "summary.json").write_text("{}")
        with lock:
            running[0] -= 1
            threads.append(env["OMP_NUM_THREADS"])

    monkeypatch.setattr(budget, "_python", train)
    budget.run_final(spec, tmp_path / "out", jobs=2)
    assert peak[0] == 2 and threads == ["2"] * 6  # natural and fast: 1 seed at budget 2, 2 at budget 4
    budget.run_final(spec, tmp_path / "out", jobs=2)  # all trained: nothing runs again
    assert len(threads) == 6


TRIAL_LRS = {"t0": 0.3, "t1": 0.2, "t2": 0.1}  # the fake searches' trials: t0 the best, t2 the worst


def _fake_searches(out, trials):
    """Finished Fast-FGSM searches at budgets 2 and 4 of the three TRIAL_LRS trials."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for cell in ("budget2", "budget4"):
        sweep = out / "search" / "compactcnn" / cell / "fast"
        sweep.mkdir(parents=True)
        pq.write_table(pa.table({"trial_id": list(TRIAL_LRS), "optim.lr": list(TRIAL_LRS.values()),
                                 "methods.fast.alpha_factor": [1.0] * 3, "status": ["completed"] * 3,
                                 "objective": [0.5, 0.4, 0.3]}), sweep / "results.parquet")
        (sweep / "done.json").write_text(json.dumps({"trials": trials}))


def _fake_finals(monkeypatch, trained, *, t0_seed_1):
    """Final runs without training: t0's run at an odd seed index ends at chance ("chance") or
    diverges ("diverges": diverged.json and exit status 3, as the trainer does); (budget, lr) of
    each run goes to ``trained``."""
    from atcd_ray import budget

    def train(module, *args, env=None):
        run = Path(args[args.index("--out") + 1])
        lr = next((float(a.split("=")[1]) for a in args if a.startswith("optim.lr=")), None)
        odd_t0 = lr == TRIAL_LRS["t0"] and int(next(a.split("=")[1] for a in args if a.startswith("seed="))) % 2
        run.mkdir(parents=True)
        trained.append((run.parts[-3], lr))
        if odd_t0 and t0_seed_1 == "diverges":
            (run / "diverged.json").write_text(json.dumps({"error": "non-finite training loss"}))
            raise subprocess.CalledProcessError(3, ["atcd_ray.train"])
        (run / "model.safetensors").write_text("weights")
        (run / "summary.json").write_text(json.dumps({
            "checkpoint": "model.safetensors", "lr": lr, "config": {"optim": {"lr": lr}, "methods": {"fast": {
                "alpha_factor": 1.0}}}, "final_epoch": {"val_clean_acc": 0.1 if odd_t0 else 0.8}}))

    monkeypatch.setattr(budget, "_python", train)
    monkeypatch.setattr(budget, "run_autoattack", lambda *args, **kwargs: None)
    monkeypatch.setattr(budget, "save_weights_only", lambda source, target: shutil.copyfile(source, target))


def test_a_winner_whose_finals_collapse_is_set_aside_for_the_next_best_trial(tmp_path, monkeypatch):
    """The stability rule (``reject_collapsed``): the best trial's finals end at chance on one seed
    (its validation, never the test set), so its runs move to collapsed/<method>/<trial> here and
    in the record, and the next-best trial trains in its place; a rerun trains nothing again.
    Positive control: without the rule the collapsed winner stays."""
    from atcd_ray import budget
    from atcd_ray.report import set_aside_section

    trained = []
    _fake_finals(monkeypatch, trained, t0_seed_1="chance")
    for rule in (False, True):
        spec = load_budget_study(_spec_file(tmp_path, reject_collapsed=rule))
        out, record = tmp_path / f"out-{rule}", tmp_path / f"record-{rule}"
        _fake_searches(out, spec.trials)
        trained.clear()
        budget.run_final(spec, out, record)
        fast = out / "final" / "compactcnn" / "budget4" / "fast"
        winners = json.loads((out / "winners.json").read_text())
        if not rule:  # positive control: the collapsed winner is kept
            assert json.loads((fast / "seed1" / "summary.json").read_text())["lr"] == TRIAL_LRS["t0"]
            assert winners["compactcnn/budget4/fast"]["trial_id"] == "t0"
            continue
        # budget 2 has one seed (index 0), which does not collapse: t0 stays there
        assert winners["compactcnn/budget2/fast"]["trial_id"] == "t0"
        assert winners["compactcnn/budget4/fast"]["trial_id"] == "t1"
        assert [json.loads((fast / s / "summary.json").read_text())["lr"] for s in ("seed0", "seed1")] == [0.2, 0.2]
        for root in (out, record):
            aside = root / "final" / "compactcnn" / "budget4" / "collapsed" / "fast" / "t0"
            assert json.loads((aside / "seed1" / "summary.json").read_text())["final_epoch"]["val_clean_acc"] == 0.1
        kept = json.loads((record / "final" / "compactcnn" / "budget4" / "fast" / "seed1" / "summary.json").read_text())
        assert kept["lr"] == 0.2
        assert trained.count(("budget4", 0.3)) == 2 and trained.count(("budget4", 0.2)) == 2
        assert "| compactcnn | 4 | fast | t0 | seed1 | 2 |" in "\n".join(set_aside_section(spec, record))
        budget.run_final(spec, out, record)  # a rerun: nothing trains again, the choice stands
        assert len(trained) == (1 + 1) + (2 + 2 + 2)  # natural and fast at 2; natural, t0, t1 at 4
        assert json.loads((out / "winners.json").read_text()) == winners
        # A set-aside half done (or an older record restored): t0's runs are back in fast/. They go
        # aside again, without being taken for t1's; t1's runs train again here, the record keeps its own.
        shutil.rmtree(fast)
        shutil.copytree(out / "final" / "compactcnn" / "budget4" / "collapsed" / "fast" / "t0", fast)
        budget.run_final(spec, out, record)
        assert budget.set_aside_trials(out, model="compactcnn", budget=4, method="fast") == ("t0",)
        assert [json.loads((fast / s / "summary.json").read_text())["lr"] for s in ("seed0", "seed1")] == [0.2, 0.2]
        assert json.loads((record / "final/compactcnn/budget4/fast/seed1/summary.json").read_text())["lr"] == 0.2
        assert json.loads((out / "winners.json").read_text()) == winners
        # Runs that trained neither the winner's knobs nor a passed-over trial's are refused
        summary = json.loads((fast / "seed0" / "summary.json").read_text())
        (fast / "seed0" / "summary.json").write_text(json.dumps({**summary, "config": {"optim": {"lr": 0.05}}}))
        with pytest.raises(ConfigError, match="did not train trial t1's knobs"):
            budget.run_final(spec, out, record)


def test_a_failed_or_interrupted_final_stops_the_stage_and_no_queued_run_starts(tmp_path, monkeypatch):
    """The first failure (or Ctrl-C, in a run's thread or the main one) ends the stage: the pool
    does not go on to start the runs still queued as it closes (it did: a Ctrl-C started two more)."""
    from atcd_ray import budget

    spec = load_budget_study(_spec_file(tmp_path))
    monkeypatch.setattr(budget, "winner", lambda *args, **kwargs: {"overrides": [], "params": {}})
    started = []

    def train(module, *args, env=None):
        started.append(args[args.index("--out") + 1])
        raise KeyboardInterrupt

    monkeypatch.setattr(budget, "_python", train)
    with pytest.raises(KeyboardInterrupt):
        budget.run_final(spec, tmp_path / "out", jobs=1)
    assert len(started) == 1  # of the 2 runs queued at budget 2


def test_a_final_that_diverges_sets_its_winner_aside_under_the_rule_and_stops_the_stage_without(tmp_path,
                                                                                                 monkeypatch):
    """A final run that diverges (exit status 3, diverged.json) is, under the stability rule, a
    collapse: its winner is set aside (the diverged run kept in the record) and the next-best
    trial trains; without the rule it stops the stage, as any failure does."""
    from atcd_ray import budget
    from atcd_ray.report import set_aside_section

    trained = []
    _fake_finals(monkeypatch, trained, t0_seed_1="diverges")
    spec = load_budget_study(_spec_file(tmp_path, reject_collapsed=False))
    _fake_searches(tmp_path / "off", spec.trials)
    with pytest.raises(subprocess.CalledProcessError):
        budget.run_final(spec, tmp_path / "off", tmp_path / "off-record")
    spec = load_budget_study(_spec_file(tmp_path, reject_collapsed=True))
    out, record = tmp_path / "out", tmp_path / "record"
    _fake_searches(out, spec.trials)
    budget.run_final(spec, out, record)
    assert json.loads((out / "winners.json").read_text())["compactcnn/budget4/fast"]["trial_id"] == "t1"
    for root in (out, record):
        assert (root / "final/compactcnn/budget4/collapsed/fast/t0/seed1/diverged.json").exists()
    assert "| compactcnn | 4 | fast | t0 | seed1 | 2 |" in "\n".join(set_aside_section(spec, record))
    budget.run_final(spec, out, record)  # a rerun: the diverged run is an outcome, nothing trains again
    # off: natural twice, then t0 (seed index 1 stops the stage); on: natural, t0 and t1 twice each
    assert len([t for t in trained if t[0] == "budget4"]) == 4 + 6


def test_a_diverged_final_is_recorded_before_its_cell_ends_and_comes_back_on_a_fresh_machine(tmp_path):
    """A resumed study (a fresh machine: ``out`` empty, the record only) must not train again a
    final that diverged while its cell was still going: it did, when only summaries were kept."""
    from atcd_ray.budget import restore_record, save_record

    out, record, fresh = tmp_path / "out", tmp_path / "record", tmp_path / "fresh"
    run = out / "final/compactcnn/budget24/trades/seed1"
    run.mkdir(parents=True)
    (run / "diverged.json").write_text(json.dumps({"error": "non-finite training loss"}))
    (run / "last.safetensors").write_text("half-trained weights, never recorded")
    save_record(out, record)
    assert sorted(p.name for p in (record / "final/compactcnn/budget24/trades/seed1").iterdir()) == ["diverged.json"]
    assert restore_record(record, fresh) == 1
    restored = fresh / "final/compactcnn/budget24/trades/seed1/diverged.json"
    assert restored.read_text() == (run / "diverged.json").read_text()
