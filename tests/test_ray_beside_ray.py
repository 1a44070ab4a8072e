"""A run beside another Ray on the same machine (another run, or a ``ray start --head``): it
starts a Ray of its own, prints no traceback (Ray Train's placement-group cleaner used to fail
with "Found multiple active Ray instances"), and leaves no placement group behind."""
import json
import subprocess
import sys

import psutil
import pytest

from .test_distributed import _env

# Another Ray: the suite's shared one (``shared_ray``), a driver that started a local instance
# with its dashboard and waits, which is what another run looks like.


# The run, then the state of every placement group its Ray made, before that Ray goes.
RUN = """
import json, sys
import ray
from atcd_ray.cli import run_main
from atcd_ray.train import main
code = run_main(main, sys.argv[1:])
print("PLACEMENT_GROUPS " + json.dumps(sorted(g["state"] for g in ray.util.placement_group_table().values())))
sys.exit(code)
"""


def _alive(shared_ray) -> bool:
    try:
        return psutil.Process(shared_ray.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(600)
def test_a_run_beside_another_ray_is_quiet_and_cleans_its_placement_groups(tmp_path, shared_ray):
    assert _alive(shared_ray)  # the other Ray is there before the run, and after it (below)
    proc = subprocess.run([sys.executable, "-c", RUN, "digits", "--workers", "1", "--epochs", "2", "--subset", "256",
                           "--eval-n", "64", "--out", str(tmp_path / "run"), "--set", "eval.attacks=[fgsm]"],
                          capture_output=True, text=True, env=_env(), timeout=500)  # _env(): not joining it
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert _alive(shared_ray)
    assert "Traceback" not in output and "multiple active Ray instances" not in output, output[-6000:]
    # Nor Ray 2.60's error line on starting Ray Train's preemption watcher, which a local Ray does
    # not start (no cloud drains this machine); the README's first command printed it before.
    assert "PreemptionWatcher" not in output, output[-6000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("PLACEMENT_GROUPS ")]
    states = json.loads(line.split(" ", 1)[1])
    assert states and set(states) == {"REMOVED"}, states  # the workers' group (and any other), removed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2


def test_positive_control_the_state_api_without_an_address_fails_beside_another_ray(shared_ray):
    """What the cleaner hit: beside another Ray, the state API with no address refuses to pick.
    (The check above would see the traceback it printed.)"""
    probe = ("import ray\nfrom ray.util.state import list_actors\nray.init(address='local')\n"
             "try:\n    list_actors()\nexcept ConnectionError as err:\n    print('REFUSED', err)\n")
    env = {k: v for k, v in _env().items() if k != "RAY_API_SERVER_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED Found multiple active Ray instances" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
