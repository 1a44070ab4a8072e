"""Reports: a run's curves, test table and attack curves; a sweep's table and per-parameter plots."""
import json
import subprocess
import sys

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atcd_ray.report import main as report_main

from .test_distributed import _env


def _png_ok(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "atcd"
    subprocess.run([sys.executable, "-m", "atcd_ray.train", "digits", "--method", "atcd", "--workers", "0",
                    "--epochs", "2", "--eval-n", "100", "--out", str(out), "--set", "eval.attacks=[pgd10]",
                    "--set", "train.val_n=64", "--quiet"], check=True, env=_env(), timeout=600, capture_output=True)
    return out


def test_run_report_has_curves_test_table_and_attack_curves(digits_run, capsys):
    args = [str(digits_run), "--eval-n", "64", "--steps", "1,10", "--eps-scales", "0.5,1"]
    assert report_main(args) == 0
    report = digits_run / "report"
    for name in ("curves.png", "attack_steps.png", "eps.png"):
        _png_ok(report / name)
    summary = json.loads((digits_run / "summary.json").read_text())
    text = (report / "report.md").read_text()
    assert f"| {summary['clean_acc']:.2%} | {summary['robust_acc']['pgd10']:.2%} |" in text
    history = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert f"| 2 | {history[1]['train_loss']:.4g} |" in text
    curves = json.loads((report / "attack_curves.json").read_text())
    assert curves["n"] == 64 and [p["x"] for p in curves["steps"]] == [1, 10]
    for point in curves["steps"]:
        assert f"| {point['x']} | {point['acc']:.2%} |" in text
    for point in [{"x": 0.0, "acc": curves["clean"]}, *curves["eps_scale"]]:  # against the attack's eps
        assert f"| {point['x'] * curves['eps']:.4g} | {point['acc']:.2%} |" in text
        assert 0 <= point["acc"] <= 1
    assert not (report / "robustbench.json").exists()  # no AutoAttack evaluation in the run yet
    # Same settings: the cached curves are reused, not recomputed.
    stamp = (report / "attack_curves.json").stat().st_mtime
    assert report_main(args) == 0 and (report / "attack_curves.json").stat().st_mtime == stamp


def test_sweep_report_averages_repeats_per_value(tmp_path):
    rows = [{"trial_id": f"t{i}", "methods.atcd.lam": lam, "status": "completed", "epochs": 2, "objective": rob,
             "val_clean_acc": clean, "val_robust_acc": rob, "test_clean_acc": clean, "test_pgd20_acc": rob}
            for i, (lam, clean, rob) in enumerate([(0.25, 0.8, 0.5), (0.25, 0.9, 0.7), (4.0, 0.7, 0.6)])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "results.parquet")
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "lambda-rho", "dataset": "fashion-mnist", "params": {"methods.atcd.lam": {"grid": [0.25, 4]}},
        "metric": {"val_robust_acc": 1.0}, "mode": "max", "fixed": {}}))
    assert report_main([str(tmp_path)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| 0.25 | 85.00% | 60.00% | 85.00% | 60.00% |" in text  # the mean of the two repeats
    assert "| 4.0 | 70.00% | 60.00% | 70.00% | 60.00% |" in text
    _png_ok(tmp_path / "report" / "methods_atcd_lam.png")


def test_report_of_something_else_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.report", str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 2 and "neither a run" in proc.stderr


def test_sweep_report_of_bundles_plots_categories(tmp_path):
    labels = ["T=1, K=8", "T=4, K=2", "method=free, replays=8"]
    rows = [{"trial_id": f"t{i}", "T, K": label, "status": "completed", "epochs": 2, "objective": 0.5 + i / 10,
             "val_clean_acc": 0.8, "val_robust_acc": 0.5 + i / 10} for i, label in enumerate(labels)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "results.parquet")
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "txk", "dataset": "fashion-mnist", "params": {"T, K": {"grid": []}},
        "metric": {"val_robust_acc": 1.0}, "mode": "max", "fixed": {}}))
    assert report_main([str(tmp_path)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| method=free, replays=8 | 80.00% | 70.00% |" in text
    _png_ok(tmp_path / "report" / "T__K.png")


def test_a_run_evaluated_with_autoattack_gets_a_robustbench_entry(digits_run, tmp_path):
    import shutil

    from atcd_ray import evaluate
    from atcd_ray.cli import run_main
    from atcd_ray.report import eps_text

    digits_run = shutil.copytree(digits_run, tmp_path / "atcd")  # the module's run stays without one
    checkpoint = digits_run / json.loads((digits_run / "summary.json").read_text())["checkpoint"]
    # eps 0.3: AutoAttack breaks this model at once (APGD-CE), so FAB and Square have nothing left to do
    assert run_main(evaluate.main, [str(checkpoint), "--attacks", "pgd10,autoattack", "--eval-n", "16", "--eps", "0.3",
                                    "--json", str(digits_run / "aa.json")]) == 0
    assert report_main([str(digits_run), "--eval-n", "0"]) == 0
    evaluation = json.loads((digits_run / "aa.json").read_text())
    entry = json.loads((digits_run / "report" / "robustbench.json").read_text())
    assert (entry["dataset"], entry["architecture"], entry["threat_model"], entry["eps"]) == (
        "digits", "compactcnn", "Linf", "0.3")
    assert entry["clean_acc"] == f"{100 * evaluation['clean_acc']:.2f}"
    assert entry["autoattack_acc"] == f"{100 * evaluation['robust_acc']['autoattack']:.2f}"
    assert entry["n_examples"] == 16 and entry["attack"].startswith("pyautoattack 0.2.0")
    assert entry["commit"] == evaluation["provenance"]["commit"][:10] + ("+dirty" if evaluation["provenance"]["dirty"]
                                                                         else "")
    assert entry["autoattack_flags"] == evaluation["autoattack_flags"] and isinstance(entry["autoattack_flags"], dict)
    assert "## RobustBench-style entry" in (digits_run / "report" / "report.md").read_text()
    assert [eps_text(e) for e in (8 / 255, 4 / 255, 0.1, 0.2, 1.0)] == ["8/255", "4/255", "0.1", "0.2", "1"]
