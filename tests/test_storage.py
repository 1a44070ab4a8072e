"""Checkpoints on object storage: ``load_model`` and ``python -m atcd_ray.evaluate`` read them from
an s3:// URI, here a real S3 server (SeaweedFS) on 127.0.0.1; bad URIs are one clear error."""
import json
import os
import subprocess
import sys

import pyarrow.fs
import pytest
import torch

import atcd_ray
from atcd_ray import evaluate
from atcd_ray.cli import run_main
from atcd_ray.config import load_config
from atcd_ray.core.checkpoint import save_checkpoint
from atcd_ray.core.models import build_model


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def upload(local, uri):
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=filesystem)


def test_load_model_and_evaluate_read_a_checkpoint_from_s3(s3_env, trained_digits_model, tmp_path, capsys):
    local = save_checkpoint(tmp_path / "model.safetensors", trained_digits_model, load_config("digits").to_dict())
    uri = "s3://runs/models/digits/model.safetensors"
    upload(local, uri)

    remote = atcd_ray.load_model(uri)
    for (name, a), (_, b) in zip(atcd_ray.load_model(local).state_dict().items(), remote.state_dict().items()):
        assert torch.equal(a, b), name
    assert not remote.training

    args = ["--attacks", "pgd10", "--eval-n", "32", "--batch-size", "16"]
    assert run_main(evaluate.main, [str(local), *args, "--json", str(tmp_path / "local.json")]) == 0
    assert run_main(evaluate.main, [uri, *args, "--json", str(tmp_path / "remote.json")]) == 0
    here, there = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert there["checkpoint"] == uri and there["correct"] == here["correct"]
    assert 0 < there["robust_acc"]["pgd10"] < there["clean_acc"]

    # Two Ray actors, each copying the object for itself (the AWS environment goes with them)
    sharded = tmp_path / "actors.json"
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.evaluate", uri, *args, "--workers", "2", "--json",
                           str(sharded)], env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(sharded.read_text())["correct"] == here["correct"]

    # The object replaced by another model: its stored batches are not reused
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model("smallcnn", 10, 1),
                            load_config("digits").to_dict())
    upload(other, uri)
    assert run_main(evaluate.main, [uri, *args, "--json", str(tmp_path / "remote.json")]) == 2
    assert "(its checkpoint_sha256 differ)" in capsys.readouterr().err


def test_a_missing_or_malformed_uri_is_one_clear_error(s3_env, capsys):
    assert run_main(evaluate.main, ["s3://runs/models/none.safetensors"]) == 2
    assert "s3://runs/models/none.safetensors: no such file" in capsys.readouterr().err
    assert run_main(evaluate.main, ["s3://runs/models/x.safetensors?bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://runs/models/x.safetensors?bogus=1: cannot be read") and err.count("\n") == 1
