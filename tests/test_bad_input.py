"""Bad input, tried wholesale: every row of the table is refused with one line naming the problem,
exit status 2, before any work, and nothing is written (a new run directory is not created, an
existing one is left byte for byte as it was)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from atcd_ray import evaluate, train
from atcd_ray.cli import run_main

SMALL = ["--workers", "0", "--epochs", "1", "--subset", "256", "--eval-n", "32", "--quiet",
         "--set", "train.val_n=32", "--set", "eval.attacks=[fgsm]", "--set", "train.val_attack=fgsm"]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()} if directory.exists() else {}


def refused(main, args, capsys) -> str:
    try:
        status = run_main(main, args)
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_main(train.main, ["digits", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "broken.yaml").write_text("train: [epochs: 3\n")
    (root / "list.yaml").write_text("- dataset: digits\n")
    (root / "text.safetensors").write_text("not a checkpoint\n")
    save_file({"w": torch.zeros(2)}, str(root / "foreign.safetensors"))
    (root / "a-file").write_text("")
    return root


TRAIN = [
    # wrong types
    (["digits", "--set", "train.epochs=ten"], "train.epochs: expected int, got 'ten'"),
    (["digits", "--set", "data.batch_size=1.5"], "data.batch_size: expected int, got 1.5"),
    (["digits", "--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["digits", "--set", "eval.attacks=pgd20"], "eval.attacks: expected a list, got 'pgd20'"),
    # NaN and inf
    (["digits", "--set", "optim.lr=nan"], "optim.lr: must be a finite number, got 'nan'"),
    (["digits", "--set", "methods.atcd.tau=.inf"], "methods.atcd.tau: must be a finite number, got inf"),
    (["digits", "--eps", "nan"], "eps: must be a finite number, got nan"),
    # negative and zero sizes
    (["digits", "--epochs", "-3"], "epochs must be > 0, got -3"),
    (["digits", "--subset", "0"], "subset must be > 0, got 0"),
    (["digits", "--eval-n", "-5"], "n must be > 0, got -5"),
    (["digits", "--set", "data.batch_size=-1"], "batch_size must be > 0, got -1"),
    (["digits", "--workers", "-1"], "--workers takes N or MIN-MAX, not '-1'"),
    (["digits", "--workers", "3-2"], "--workers 3-2: need 0 <= N, or 1 <= MIN <= MAX"),
    (["digits", "--workers", "0-2"], "--workers 0-2: need 0 <= N, or 1 <= MIN <= MAX"),
    (["digits", "--workers", "2-x"], "--workers takes N or MIN-MAX, not '2-x'"),
    (["digits", "--workers", "2-"], "--workers takes N or MIN-MAX, not '2-'"),
    (["digits", "--workers", "1-65"], "data.batch_size: 64 is fewer rows than --workers 65"),
    (["digits", "--max-failures", "-1"], "--max-failures must be >= 0"),
    (["digits", "--gpu", "--workers", "0"], "--gpu reserves GPUs for Ray Train workers"),
    # unknown keys and names
    (["digits", "--set", "train.lr=0.1"], "train.lr: unknown key; allowed: method, epochs"),
    (["digits", "--set", "nokey=1"], "nokey: unknown key"),
    (["digits", "--method", "magic"], "method must be one of"),
    (["digits", "--set", "methods.atcd.K=0"], "methods.atcd: K must be >= 1"),
    (["digits", "--set", "methods.atcd.init=fresh"], "methods.atcd: init must be one of: carry, carry_delta, uniform"),
    (["digits", "--set", "methods.atcd.kick=raw"], "methods.atcd: kick must be one of: sign, gradient"),
    (["digits", "--set", "methods.atcd.order=drift"], "methods.atcd: order must be one of: kick_drift, drift_kick"),
    (["digits", "--set", "methods.atcd.mh_start=old"], "methods.atcd: mh_start must be one of: evaluate, reuse"),
    (["digits", "--method", "nfgsm", "--set", "methods.nfgsm.k=-1"], "methods.nfgsm: k must be >= 0"),
    (["digits", "--method", "nfgsm", "--set", "methods.nfgsm.alpha_factor=0"], "methods.nfgsm: alpha_factor must be > 0"),
    (["digits", "--method", "nfgsm", "--set", "methods.nfgsm.clip=maybe"], "methods.nfgsm.clip: expected bool, got 'maybe'"),
    (["digits", "--eps", "-1"], "eps must be >= 0"),
    (["svhn"], "dataset: unknown dataset 'svhn'"),
    (["digits", "--set", "novalue"], "--set expects key=value, got 'novalue'"),
    # missing files, unreadable directories, recipes that are not recipes
    (["digits", "--recipe", "{files}/missing.yaml"], "recipe {files}/missing.yaml does not exist"),
    (["digits", "--recipe", "{files}/broken.yaml"], "recipe {files}/broken.yaml is not valid YAML"),
    (["digits", "--recipe", "{files}/list.yaml"], "recipe {files}/list.yaml: expected a mapping of config keys, got list"),
    (["fashion-mnist", "--data-dir", "{files}/nowhere"], "apt-get install -y dataset-fashion-mnist"),
    (["fashion-mnist", "--data-dir", "{files}/a-file"], "{files}/a-file"),
    (["digits", "--set", "data.ffcv_dir={files}/nowhere"], "{files}/nowhere/train.beton does not exist"),
]


@pytest.mark.parametrize("args, message", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_train_refuses_bad_input(args, message, files, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a.replace("{files}", str(files)) for a in args]
    line = refused(train.main, [*args, "--out", str(out)], capsys)
    assert message.replace("{files}", str(files)) in line, line
    assert not out.exists()


def test_resuming_a_run_with_another_config_or_more_epochs_or_another_launcher(finished_run, capsys):
    before = snapshot(finished_run)
    for extra, message in [
        (["--eps", "0.2"], "was written by another config (eps: 0.1 there, 0.2 here); resume with the same config"),
        (["--set", "optim.lr=0.1"], "(optim.lr: 0.05 there, 0.1 here)"),
        (["--epochs", "3"], "was started with train.epochs=1, and its learning-rate schedule (cosine) is laid over "
                            "those epochs: it cannot be extended to 3. Resume it with --epochs 1, or train 3 epochs "
                            "in another --out"),
    ]:
        line = refused(train.main, ["digits", *SMALL, *extra, "--out", str(finished_run)], capsys)
        assert message in line, line
    line = refused(train.main, ["digits", *SMALL, "--workers", "1", "--out", str(finished_run)], capsys)
    assert "was trained in-process (--workers 0); resume it the same way" in line
    assert snapshot(finished_run) == before


def test_evaluate_refuses_bad_input(finished_run, files, tmp_path, capsys):
    checkpoint = str(finished_run / "last.safetensors")
    before = snapshot(finished_run)
    cases = [
        ([f"{files}/missing.safetensors"], "checkpoint {files}/missing.safetensors does not exist"),
        ([f"{files}/text.safetensors"], "{files}/text.safetensors is not a readable safetensors checkpoint"),
        ([f"{files}/foreign.safetensors"], "{files}/foreign.safetensors is not an atcd_ray checkpoint"),
        ([checkpoint, "--dataset", "cifar10"], f"--dataset cifar10: {checkpoint} is a compactcnn for digits "
                                               "(1x28x28 images, 10 classes), not for cifar10 (3x32x32, 10 classes)"),
        ([checkpoint, "--dataset", "svhn"], "unknown dataset 'svhn'"),
        ([checkpoint, "--eps", "nan"], "--eps must be a finite number >= 0"),
        ([checkpoint, "--eps", "-0.1"], "--eps must be a finite number >= 0"),
        ([checkpoint, "--eval-n", "0"], "--eval-n and --batch-size > 0"),
        ([checkpoint, "--attacks", "pgd20,bogus"], "--attacks: unknown attack 'bogus'"),
        ([checkpoint, "--attacks", "square0"], "the query budget must be >= 1"),
        ([checkpoint, "--data-dir", f"{files}/nowhere", "--dataset", "mnist"], "{files}/nowhere"),
    ]
    for args, message in cases:
        json_out = tmp_path / "result.json"
        line = refused(evaluate.main, [*args, "--json", str(json_out)], capsys)
        assert message.replace("{files}", str(files)) in line, line
        assert not json_out.exists()
    assert snapshot(finished_run) == before


def test_a_bad_flag_is_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.train", "digits", "--epochs", "three", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: argument --epochs: invalid int value: 'three' (see --help)\n"
    assert not (tmp_path / "run").exists()
