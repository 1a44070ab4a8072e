"""Trajectory shift (Definition 5.1, Eq. 15): identical trajectories give zero shift; the command
writes its table and figure."""
import json
import subprocess
import sys

from atcd_ray.config import load_config
from atcd_ray.trajectory_shift import measure


def test_equal_lengths_have_no_shift():
    cfg = load_config("digits", overrides=[("data.subset", 128)])
    result = measure(cfg, k=2, k_prime=2, replays=2, epochs=1)
    assert result["steps"] == 2 and len(result["layers"]) == 4  # CompactCNN: 2 conv + 2 linear weights
    for name in result["layers"]:
        assert max(result["l2"][name]) == 0.0
        assert min(result["cosine"][name]) > 0.999999


def test_command_writes_table_and_figure(tmp_path):
    subprocess.run([sys.executable, "-m", "atcd_ray.trajectory_shift", "digits", "--k", "1", "--k-prime", "4",
                    "--T", "4", "--subset", "256", "--out", str(tmp_path)], check=True, timeout=600,
                   capture_output=True)
    result = json.loads((tmp_path / "trajectory_shift.json").read_text())
    assert (result["T"], result["T_prime"], result["steps"]) == (4, 1, 4)
    cosines = [c for name in result["layers"] for c in result["cosine"][name]]
    assert all(-1 <= c <= 1 for c in cosines) and min(cosines) < 0.999  # different lengths do shift
    assert (tmp_path / "trajectory_shift.png").stat().st_size > 10_000
    assert "| layer | mean L2 difference |" in (tmp_path / "trajectory_shift.md").read_text()


def test_same_weights_mode_restarts_the_probe_from_the_trained_copy():
    cfg = load_config("digits", overrides=[("data.subset", 256)])
    equal = measure(cfg, k=2, k_prime=2, replays=2, epochs=1, same_weights=True)
    assert all(max(equal["l2"][name]) == 0.0 for name in equal["layers"])  # weights, chain and RNG all copied
    probe = measure(cfg, k=1, k_prime=4, replays=4, epochs=1, same_weights=True)
    free = measure(cfg, k=1, k_prime=4, replays=4, epochs=1)
    for name in probe["layers"]:
        assert probe["l2"][name][0] == free["l2"][name][0]  # the first minibatch starts identical either way
        assert probe["l2"][name][1:] != free["l2"][name][1:]  # later, copy B restarts from copy A
