"""Sweeps: space files are validated before Ray starts; a real sweep writes its table and
TensorBoard; a sweep interrupted with Ctrl-C resumes with --resume and retrains nothing finished."""
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from atcd_ray.config import ConfigError
from atcd_ray.search_space import SearchSpace, bundle_label, load_search_space
from atcd_ray.sweep import Sizing, make_scheduler, make_searcher, param_space

from .test_distributed import _env

ROOT = Path(__file__).resolve().parent.parent
# Not the budget study's files (its spec and its pinned base recipe): python -m atcd_ray.study reads them
SPACES = sorted(p for p in (ROOT / "tune_spaces").glob("*.yaml")
                if "_budget" not in p.stem and "_fair" not in p.stem)  # budget studies and their pinned bases


def _space(tmp_path, **tree):
    tree = {"study": "s", "dataset": "digits", "params": {"methods.atcd.lam": {"grid": [1, 2]}}, **tree}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_every_shipped_space_loads_and_covers_the_papers_studies():
    assert len(SPACES) >= 5
    studies = {load_search_space(p).study: load_search_space(p) for p in SPACES}
    lam = studies["lambda-rho"].params["methods.atcd.lam"]["grid"]
    assert min(lam) == 1 / 32 and max(lam) == 32 and studies["lambda-rho"].fixed["methods.atcd.rho"] == 1
    txk = studies["txk"]
    for label, overrides in txk.bundles("T, K").items():
        if "methods.atcd.T" in overrides:  # Table 5: a fixed budget T K = 8
            assert overrides["methods.atcd.T"] * overrides["methods.atcd.K"] == 8
    assert list(txk.bundles("T, K"))[-1] == "method=free, replays=8"
    assert studies["trajectory-length"].params["methods.atcd.K"]["grid"] == list(range(1, 9))
    assert studies["imagenet-resnet50"].dataset == "imagenet"


@pytest.mark.parametrize("tree, message", [
    ({"budget": 3}, "budget: unknown key"),
    ({"params": {"methods.atcd.lamda": {"grid": [1]}}}, "params.methods.atcd.lamda"),
    ({"params": {"methods.atcd.lam": {"grid": []}}}, "params.methods.atcd.lam.grid: empty"),
    ({"params": {"methods.atcd.lam": {"uniform": [2, 1]}}}, "low < high"),
    ({"params": {"methods.atcd.lam": {"loguniform": [0, 1]}}}, "low must be > 0"),
    ({"params": {"methods.atcd.T": {"grid": [0, 2]}}}, "T must be >= 1"),
    ({"params": {"methods.atcd.T": {"randint": [1.5, 4]}}}, "integers"),
    ({"params": {"methods.atcd.lam": {"grid": [1], "choice": [2]}}}, "exactly one of"),
    ({"params": {}}, "at least one"),
    ({"metric": "test_acc"}, "metric:"),
    ({"searcher": "tpe"}, "searcher: tpe samples; it cannot run a grid"),
    ({"searcher": "optuna"}, "searcher: must be one of random, tpe, bohb; got 'optuna'"),
    ({"search": "optuna"}, "search: renamed searcher: random | tpe | bohb"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler: searcher bohb runs with"),
    ({"searcher": "bohb", "scheduler": {"name": "asha"}, "params": {"methods.atcd.lam": {"choice": [1, 2]}}},
     "scheduler: searcher bohb runs with"),
    ({"points_to_evaluate": [{"methods.atcd.lam": 1}]}, "points_to_evaluate: a grid runs every value already"),
    ({"fixed": {"train.method": "pgdd"}}, "fixed: train: method must be one of"),
    ({"budgets": [4, 12]}, "is a budget study: run it with python -m atcd_ray.study"),
    ({"search_seed": "zero"}, "search_seed: must be an integer"),
])
def test_a_bad_space_is_one_clear_error(tmp_path, tree, message):
    with pytest.raises(ConfigError, match=message):
        load_search_space(_space(tmp_path, **tree))


SAMPLED = {"methods.atcd.lam": {"loguniform": [0.5, 8]}, "methods.atcd.T": {"randint": [1, 4]},
           "T, K": {"choice": [{"methods.atcd.K": 1}, {"methods.atcd.K": 2, "methods.atcd.reuse_grad": True}]},
           "optim.schedule": {"choice": ["cosine", "cyclic"]}}
POINT = {"methods.atcd.lam": 2.0, "methods.atcd.T": 2, "T, K": {"methods.atcd.K": 1}, "optim.schedule": "cyclic"}


@pytest.mark.parametrize("change, message", [
    ({"methods.atcd.lamda": 2.0}, r"points_to_evaluate\[0\].methods.atcd.lamda: not a searched key"),
    ({"methods.atcd.lam": 9.0}, r"points_to_evaluate\[0\].methods.atcd.lam: 9.0 is not in the space"),
    ({"methods.atcd.lam": "2"}, r"points_to_evaluate\[0\].methods.atcd.lam: '2' is not in the space"),
    ({"methods.atcd.T": 2.5}, r"points_to_evaluate\[0\].methods.atcd.T: 2.5 is not in the space \(randint"),
    ({"optim.schedule": "step"}, r"points_to_evaluate\[0\].optim.schedule: 'step' is not in the space \(choice"),
    ({"T, K": {"methods.atcd.K": 3}}, r"points_to_evaluate\[0\].T, K: .* is not one of the bundle's choice values"),
    ({"methods.atcd.T": True}, r"points_to_evaluate\[0\].methods.atcd.T: True is not in the space"),
])
def test_a_bad_fixed_trial_is_one_clear_error_with_its_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_search_space(_space(tmp_path, searcher="tpe", params=SAMPLED, points_to_evaluate=[{**POINT, **change}]))


def test_a_fixed_trial_must_give_every_searched_key_and_be_a_mapping(tmp_path):
    missing = {k: v for k, v in POINT.items() if k != "optim.schedule"}
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[1\].optim.schedule: missing"):
        load_search_space(_space(tmp_path, params=SAMPLED, points_to_evaluate=[POINT, missing], num_samples=4))
    with pytest.raises(ConfigError, match="points_to_evaluate: expected a list of mappings"):
        load_search_space(_space(tmp_path, params=SAMPLED, points_to_evaluate=POINT))


def test_fixed_trials_are_the_searchers_first_suggestions(tmp_path):
    """The positive control: a bundle by its mapping (as the space writes it) or by its label;
    each searcher, seeded, suggests the fixed points first, then draws."""
    by_label = {**POINT, "T, K": "K=2, reuse_grad=True"}
    study = load_search_space(_space(tmp_path, searcher="tpe", params=SAMPLED, points_to_evaluate=[POINT, by_label],
                              num_samples=4, search_seed=3))
    expected = [{**POINT, "T, K": "K=1"}, by_label]
    assert study.tune_points() == expected
    assert study.trial_overrides(expected[0])[-3:] == [("methods.atcd.T", 2), ("methods.atcd.K", 1),
                                                       ("optim.schedule", "cyclic")]

    def suggestions(searcher, n=3):
        searcher.set_search_properties("objective", "max", param_space(study))
        return [searcher.suggest(f"t{i}") for i in range(n)]

    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    tpe = make_searcher(study, 3, 1)
    assert isinstance(tpe, OptunaSearch) and isinstance(tpe._sampler, TPESampler)
    drawn = suggestions(tpe)
    assert drawn[:2] == expected and drawn[2] not in expected
    assert suggestions(make_searcher(study, 3, 1))[2] == drawn[2]  # the seed decides the draws
    if importlib.util.find_spec("hpbandster") and importlib.util.find_spec("ConfigSpace"):
        bohb = load_search_space(_space(tmp_path, searcher="bohb", params=SAMPLED, points_to_evaluate=[POINT],
                                        num_samples=2))
        assert bohb.scheduler == {"name": "hyperband"}
        first = suggestions(make_searcher(bohb, 3, 1), 2)
        assert first[0] == expected[0] and set(first[1]) == set(SAMPLED)


def test_a_bad_space_fails_on_the_command_line_before_ray_starts(tmp_path):
    space = _space(tmp_path, params={"methods.atcd.lam": {"grid": []}})
    proc = subprocess.run([sys.executable, "-m", "atcd_ray.tune", str(space)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: params.methods.atcd.lam.grid: empty; give a non-empty list"]


def test_bundles_move_several_keys_together_and_override_fixed_ones(tmp_path):
    study = load_search_space(_space(tmp_path, fixed={"train.method": "atcd"}, params={"T, K": {"grid": [
        {"methods.atcd.T": 2, "methods.atcd.K": 4}, {"train.method": "free", "methods.free.replays": 8}]}}))
    assert param_space(study) == {"T, K": {"grid_search": ["T=2, K=4", "method=free, replays=8"]}}
    assert study.trial_overrides({"T, K": "method=free, replays=8"}) == [
        ("train.method", "atcd"), ("train.method", "free"), ("methods.free.replays", 8)]
    assert bundle_label({"methods.atcd.T": 2}) == "T=2"


def test_repeats_of_a_grid_are_a_grid_axis_and_sampled_spaces_are_not_repeated_by_it(tmp_path):
    grid = load_search_space(_space(tmp_path))
    assert param_space(grid, repeats=3) == {"repeat": {"grid_search": [0, 1, 2]},
                                            "methods.atcd.lam": {"grid_search": [1, 2]}}
    assert grid.trial_overrides({"repeat": 2, "methods.atcd.lam": 1}) == [("methods.atcd.lam", 1)]
    sampled = load_search_space(_space(tmp_path, params={"methods.atcd.lam": {"uniform": [0.5, 4]}}))
    assert "repeat" not in param_space(sampled, repeats=3)
    with pytest.raises(ConfigError, match="params.repeat: reserved"):
        load_search_space(_space(tmp_path, params={"repeat": {"grid": [1]}}))


def test_schedulers_and_search_follow_the_space(tmp_path, monkeypatch):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = make_scheduler(load_search_space(_space(tmp_path, scheduler={"name": "asha", "grace_period": 1})), epochs=8)
    # Decisions at epochs 1, 2, 4, never at the last: a trial that gets there is tested.
    assert isinstance(asha, ASHAScheduler) and [m for m, _ in asha._brackets[0]._rungs] == [4, 2, 1]
    assert not asha._stop_last_trials
    short = make_scheduler(load_search_space(_space(tmp_path, scheduler={"name": "asha", "grace_period": 4})), epochs=3)
    assert [m for m, _ in short._brackets[0]._rungs] == [2]  # grace period cut to the epochs before the last
    assert isinstance(make_scheduler(load_search_space(_space(tmp_path)), epochs=1), FIFOScheduler)
    assert isinstance(make_scheduler(load_search_space(_space(tmp_path, scheduler={"name": "fifo"})), 3), FIFOScheduler)
    from ray.tune.schedulers import HyperBandForBOHB
    from ray.tune.search import BasicVariantGenerator

    sampled = {"methods.atcd.lam": {"loguniform": [0.5, 4]}}
    assert isinstance(make_searcher(load_search_space(_space(tmp_path)), 0, 2), BasicVariantGenerator)  # the default
    bohb = load_search_space(_space(tmp_path, searcher="bohb", params=sampled,
                             scheduler={"name": "hyperband", "reduction_factor": 2}))
    hyperband = make_scheduler(bohb, epochs=5)
    assert isinstance(hyperband, HyperBandForBOHB) and hyperband._max_t_attr == 4 and hyperband._eta == 2
    assert isinstance(make_scheduler(bohb, epochs=1), FIFOScheduler)
    # bohb's packages are optional: without them the space loads, and the sweep stops at once, naming them
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="searcher: bohb needs hpbandster and ConfigSpace"):
        make_searcher(bohb, 0, 1)


def test_concurrent_trials_fill_the_cluster_without_oversubscribing():
    assert Sizing([], workers=1, cpus_per_worker=1).concurrent_trials(cpus=2, gpus=0) == 2
    assert Sizing([], workers=2, cpus_per_worker=2).concurrent_trials(cpus=16, gpus=0) == 4
    assert Sizing([], workers=2, gpu=True, cpus_per_worker=4).concurrent_trials(cpus=64, gpus=4) == 2
    with pytest.raises(ConfigError, match="one trial needs 4 workers"):
        Sizing([], workers=4, cpus_per_worker=1).concurrent_trials(cpus=2, gpus=0)
    # Elastic trials: sized for their most workers, and one may start with its fewest on a cluster
    # that has not grown yet; not even the fewest fitting is refused.
    assert Sizing([], workers=(4, 8), gpu=True, cpus_per_worker=1).concurrent_trials(cpus=64, gpus=16) == 2
    assert Sizing([], workers=(4, 8), gpu=True, cpus_per_worker=1).concurrent_trials(cpus=64, gpus=4) == 1
    with pytest.raises(ConfigError, match="one trial needs 4 workers"):
        Sizing([], workers=(4, 8), gpu=True, cpus_per_worker=1).concurrent_trials(cpus=64, gpus=2)


def _sweep_cmd(space, out, *extra):
    return [sys.executable, "-m", "atcd_ray.tune", str(space), "--epochs", "2", "--subset", "256", "--eval-n", "100",
            "--out", str(out), "--set", "train.val_n=100", "--set", "eval.attacks=[pgd10]",
            "--set", "data.batch_size=32", *extra]


@pytest.mark.timeout(900)
def test_a_sweep_writes_its_table_and_tensorboard(tmp_path, shared_ray):
    out = tmp_path / "sweep"
    space = _space(tmp_path, fixed={"train.method": "atcd"}, scheduler={"name": "fifo"},
                   metric={"val_robust_acc": 1.0, "val_clean_acc": 0.5}, params={"methods.atcd.lam": {"grid": [2]}})
    proc = subprocess.run(_sweep_cmd(space, out, "--num-samples", "2"), capture_output=True, text=True,
                          env=_env(shared_ray), timeout=800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["repeat"] for r in rows) == [0, 1] and {r["status"] for r in rows} == {"completed"}
    seeds = {json.loads((out / "runs" / r["trial_id"] / "summary.json").read_text())["seed"] for r in rows}
    assert seeds == {0, 1}  # repeats are independent runs
    for row in rows:
        run = out / "runs" / row["trial_id"]
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        summary = json.loads((run / "summary.json").read_text())
        assert row["epochs"] == last["epoch"] == 2
        assert row["objective"] == pytest.approx(last["val_robust_acc"] + 0.5 * last["val_clean_acc"])
        assert row["test_pgd10_acc"] == summary["robust_acc"]["pgd10"] and row["test_clean_acc"] == summary["clean_acc"]
        assert summary["config"]["methods"]["atcd"]["lam"] == row["methods.atcd.lam"]
        assert list((run / "tb").glob("events.out.tfevents.*"))  # TensorBoard per trial
    assert rows[0]["objective"] >= rows[1]["objective"]  # best first
    assert (out / "results.csv").read_text().splitlines()[0].startswith('"trial_id","methods.atcd.lam"')
    rerun = subprocess.run(_sweep_cmd(space, out), capture_output=True, text=True, env=_env(shared_ray), timeout=120)
    assert rerun.returncode == 2 and "pass --resume" in rerun.stderr


def _interrupt_after_first_trial(cmd, out, *, env, wait, finish):
    """Start the sweep ``cmd``, Ctrl-C it once its first trial has finished (within ``wait``
    seconds), and let it close within ``finish`` seconds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + wait
        while not list(out.glob("runs/*/summary.json")):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before its first trial"
            time.sleep(0.5)
        time.sleep(3)  # let Tune record the finished trial and start the next
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.communicate(timeout=finish)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(900)
def test_an_interrupted_sweep_resumes_and_retrains_nothing_finished(tmp_path, shared_ray):
    space = _space(tmp_path, fixed={"train.method": "atcd"}, scheduler={"name": "fifo"},
                   params={"methods.atcd.lam": {"grid": [0.5, 1, 2]}})
    out = tmp_path / "sweep"
    # Two CPUs per worker: one trial at a time on this 2-core machine, so the order is known.
    _interrupt_after_first_trial(_sweep_cmd(space, out, "--cpus-per-worker", "2"), out, env=_env(shared_ray),
                                 wait=600, finish=300)
    first = next(out.glob("runs/*/summary.json")).parent
    first_epochs = (first / "metrics.jsonl").read_text()
    assert len(list(out.glob("runs/*/summary.json"))) < 3  # interrupted before the end

    resumed = subprocess.run(_sweep_cmd(space, out, "--cpus-per-worker", "2", "--resume"), capture_output=True,
                             text=True, env=_env(shared_ray), timeout=800)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["methods.atcd.lam"] for r in rows) == [0.5, 1, 2] and {r["status"] for r in rows} == {"completed"}
    # The finished trial was not trained again: either Tune had recorded it as done, or (Ctrl-C
    # before Tune saw it end) its run resumed from its last checkpoint and only re-tested.
    assert (first / "metrics.jsonl").read_text() == first_epochs
    for row in rows:
        epochs = [json.loads(line)["epoch"] for line in (out / "runs" / row["trial_id"] / "metrics.jsonl")
                  .read_text().splitlines()]
        assert epochs == [1, 2]


@pytest.mark.timeout(900)
def test_asha_stops_a_bad_trial_and_frees_its_workers(tmp_path, shared_ray):
    # One trial at a time; the good learning rate runs first, so when the bad one reports its
    # first epoch it is in the bottom half of that rung and ASHA stops it.
    space = _space(tmp_path, fixed={"train.method": "natural"}, metric="val_clean_acc",
                   params={"optim.lr": {"grid": [0.1, 1.0e-6]}},
                   scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    out = tmp_path / "sweep"
    # Epochs of a fraction of a second: many of them, since reports reach Tune asynchronously and
    # a stopped trial goes on for a few seconds (4 epochs here) before it stops.
    proc = subprocess.run(_sweep_cmd(space, out, "--cpus-per-worker", "2", "--epochs", "20"), capture_output=True,
                          text=True, env=_env(shared_ray), timeout=800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = {r["optim.lr"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert rows[0.1]["status"] == "completed" and rows[0.1]["epochs"] == 20
    assert rows[1.0e-6]["status"] == "stopped" and rows[1.0e-6]["epochs"] < 20
    assert rows[1.0e-6]["test_clean_acc"] is None and rows[0.1]["val_clean_acc"] > rows[1.0e-6]["val_clean_acc"]


def _trials_in_order(out):
    """The sweep's rows by trial number (0: the searcher's first trial)."""
    return sorted(pq.read_table(out / "results.parquet").to_pylist(), key=lambda r: r["trial_number"])


TPE_SPACE = {"fixed": {"train.method": "natural"}, "scheduler": {"name": "fifo"}, "metric": "val_clean_acc",
             "searcher": "tpe", "params": {"optim.lr": {"loguniform": [0.01, 0.3]}},
             "points_to_evaluate": [{"optim.lr": 0.05}], "num_samples": 3}


@pytest.mark.timeout(400)
def test_a_tpe_sweep_runs_its_fixed_trial_first_and_resumed_goes_on_with_the_same_search(tmp_path, shared_ray):
    space = _space(tmp_path, **TPE_SPACE)  # no search_seed: one is drawn and recorded
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(space, out, "--epochs", "1", "--max-concurrent", "1")
    _interrupt_after_first_trial(cmd, out, env=_env(shared_ray), wait=200, finish=120)
    assert len(list(out.glob("runs/*/summary.json"))) < 3  # interrupted before the end
    recorded = json.loads((out / "searcher.json").read_text())
    assert isinstance(recorded["search_seed"], int)
    assert recorded == {"searcher": "tpe", "search_seed": recorded["search_seed"],
                        "points_to_evaluate": [{"optim.lr": 0.05}]}

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=_env(shared_ray), timeout=250)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    rows = _trials_in_order(out)
    # Three trials in all, the fixed one once (trial 0), the third drawn after the resume: the
    # restored searcher did not start over (it would suggest the fixed trial again)
    assert [r["trial_number"] for r in rows] == [0, 1, 2] and len(list((out / "runs").iterdir())) == 3
    assert [r["optim.lr"] for r in rows].count(0.05) == 1 and rows[0]["optim.lr"] == 0.05
    assert len({r["optim.lr"] for r in rows}) == 3 and {r["status"] for r in rows} == {"completed"}  # TPE drew two
    summary = json.loads((out / "runs" / rows[0]["trial_id"] / "summary.json").read_text())
    assert summary["config"]["optim"]["lr"] == 0.05  # the fixed trial trained at its setting
    assert json.loads((out / "searcher.json").read_text()) == recorded
    assert json.loads((out / "study.json").read_text())["search_seed"] == recorded["search_seed"]
    assert {(r["searcher"], r["search_seed"]) for r in rows} == {("tpe", recorded["search_seed"])}
    assert f"searcher: tpe, seed {recorded['search_seed']}" in resumed.stdout


def test_a_budget_study_passes_its_searcher_and_fixed_trials_to_each_sweep(tmp_path):
    from atcd_ray.budget import BudgetStudy, load_budget_study

    from .test_budget import SPEC

    def spec(**changes):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**SPEC, **changes}))
        return load_budget_study(path)

    point = {"optim.lr": 0.05, "methods.fast.alpha_factor": 1.25}  # the common knob and the method's own
    study = spec(searcher="tpe", points_to_evaluate={"fast": [point]}).search_space("compactcnn", 2, "fast")
    assert (study.searcher, study.points_to_evaluate, study.num_samples) == ("tpe", [point], SPEC["trials"])
    # budget_study.json keeps the searcher's keys only where set: a study recorded before them still matches
    assert not {"searcher", "points_to_evaluate"} & set(spec(searcher="random").recorded())
    assert {"searcher", "points_to_evaluate"} <= set(spec(searcher="tpe", points_to_evaluate={"fast": [point]}).recorded())
    assert BudgetStudy(**spec(searcher="tpe", points_to_evaluate={"fast": [point]}).recorded()) == \
        spec(searcher="tpe", points_to_evaluate={"fast": [point]})  # the report reads a record back
    with pytest.raises(ConfigError, match="searcher: random or tpe"):
        spec(searcher="bohb")
    with pytest.raises(ConfigError, match=r"methods.fast \(compactcnn, budget 2\): points_to_evaluate\[0\].optim.lr"):
        spec(points_to_evaluate={"fast": [{**point, "optim.lr": 5}]})
    with pytest.raises(ConfigError, match="points_to_evaluate: a mapping of searched method"):
        spec(points_to_evaluate={"pgd": [point]})


def test_a_trial_restarted_after_its_last_epoch_reports_that_epoch_again(tmp_path):
    """Killed after its run's last epoch but before Tune took the result, a trial restarts with
    nothing to train and nothing to report; it reports the run's last validated record (epochs
    between validations, train.val_every, carry none), which Tune requires of every trial."""
    from atcd_ray.sweep import last_validated

    assert last_validated(tmp_path) is None  # a run that never finished an epoch: nothing to report
    records = [{"epoch": 1, "val_robust_acc": 0.5}, {"epoch": 2, "val_robust_acc": 0.6}, {"epoch": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert last_validated(tmp_path) == records[1]


def test_the_fixed_trials_are_numbered_first_even_where_tune_lists_them_later():
    """A resumed sweep's ResultGrid does not list the trials in the order they were made: the
    fixed trials (points_to_evaluate) are found by their values and numbered first."""
    from types import SimpleNamespace

    from atcd_ray.sweep import _searcher_order

    study = SearchSpace(study="s", dataset="digits", params={"optim.lr": {"loguniform": [0.01, 0.3]}},
                  points_to_evaluate=[{"optim.lr": 0.05}], searcher="tpe", num_samples=3)
    grid = [SimpleNamespace(config={"optim.lr": lr}, name=name)
            for name, lr in (("drawn", 0.2), ("other", 0.0501), ("fixed", 0.05))]
    assert [r.name for r in _searcher_order(grid, study)] == ["fixed", "drawn", "other"]
    assert [r.name for r in _searcher_order(grid, SearchSpace(**{**vars(study), "points_to_evaluate": []}))] == [
        "drawn", "other", "fixed"]  # no fixed trial: Tune's order
