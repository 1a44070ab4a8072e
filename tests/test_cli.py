"""The command-line contract, end to end in subprocesses, on the scikit-learn digits."""
import json
import subprocess
import sys

import pytest


def run(*args):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run("atcd_ray.train", "digits", "--method", "atcd", "--epochs", "2", "--subset", "512", "--eval-n", "200",
               "--seed", "3", "--workers", "0", "--out", str(out), "--set", "eval.attacks=[pgd10,cw10]", "--set", "train.val_n=100")
    return out, proc


def test_train_writes_the_summary_contract(trained_run):
    out, proc = trained_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ["dataset", "method", "config", "clean_acc", "robust_acc", "train_seconds", "epochs", "checkpoint"]:
        assert key in summary
    assert (summary["dataset"], summary["method"], summary["epochs"], summary["eval_n"]) == ("digits", "atcd", 2, 200)
    assert set(summary["robust_acc"]) == {"pgd10", "cw10"}
    assert all(0 <= v <= 1 for v in [summary["clean_acc"], *summary["robust_acc"].values()])
    assert summary["robust_acc"]["pgd10"] <= summary["clean_acc"]
    assert summary["train_seconds"] > 0 and summary["config"]["seed"] == 3
    assert summary["config"]["data"]["subset"] == 512
    assert (out / summary["checkpoint"]).is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert 0 < lines[-1]["train_mh_accept_rate"] <= 1 and 0 <= lines[-1]["val_robust_acc"] <= 1
    assert "| atcd |" in proc.stdout  # the results table


def test_evaluate_reproduces_clean_accuracy_and_writes_json(trained_run, tmp_path):
    out, _ = trained_run
    summary = json.loads((out / "summary.json").read_text())
    result_path = tmp_path / "eval.json"
    proc = run("atcd_ray.evaluate", str(out / summary["checkpoint"]), "--attacks", "fgsm,pgd10,mifgsm10",
               "--eval-n", "200", "--json", str(result_path))
    result = json.loads(result_path.read_text())
    assert result["clean_acc"] == summary["clean_acc"] and result["n"] == 200
    assert result["robust_acc"]["pgd10"] <= result["robust_acc"]["fgsm"] + 0.02
    assert abs(result["robust_acc"]["pgd10"] - summary["robust_acc"]["pgd10"]) <= 0.03  # other random starts
    assert "| model | clean | fgsm | pgd10 | mifgsm10 |" in proc.stdout


def test_evaluate_hmc_without_a_number_uses_the_default_proposals(trained_run, tmp_path):
    out, _ = trained_run
    robust = {}
    for name in ["hmc", "hmc20"]:
        run("atcd_ray.evaluate", str(out / "last.safetensors"), "--attacks", name, "--eval-n", "32", "--json",
            str(tmp_path / f"{name}.json"))
        robust.update(json.loads((tmp_path / f"{name}.json").read_text())["robust_acc"])
    assert robust["hmc"] == robust["hmc20"] < 1  # the default is 20 proposals: the same attack, same seed


def test_evaluate_rejects_bad_attack(trained_run):
    out, _ = trained_run
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.evaluate", str(out / "last.safetensors"), "--attacks", "pgd"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown attack 'pgd'" in proc.stderr


def test_masking_flag():
    from atcd_ray.evaluate import masking_suspected

    assert masking_suspected({"pgd20": 0.6, "square1000": 0.5}) is True
    assert masking_suspected({"pgd20": 0.6, "rays": 0.59, "autoattack": 0.55}) is False
    assert masking_suspected({"pgd20": 0.6}) is False
