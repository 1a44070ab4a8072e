"""Elastic training and preemption (issue 13): a global step is the same examples on any number of
workers, per-example method state is re-cut by rows on a resize, ranks with unequal rows average
their gradients with weights, and a preemption notice leads to a checkpoint a run resumes from."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atcd_ray import run_dir, trainer
from atcd_ray.core.checkpoint import Checkpoint
from atcd_ray.core.methods import METHODS
from atcd_ray.core.methods.base import weighted_mean_hook
from atcd_ray.data import TensorBatches
from atcd_ray.group import Group
from atcd_ray.resume import reshard_rows
from tests.test_checkpoint import quick_config
from tests.test_distributed import _model, gloo_group
from tests.test_mid_epoch import CountedSteps, _assert_same

B, N = 12, 70  # 5 whole global batches an epoch


def _epoch(world_size: int, start: int = 0, augment: str = "crop_flip"):
    """Each global step of epoch 2 as {label: image} put together from all ranks' batches."""
    images = torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    steps = {}
    for rank in range(world_size):
        part = TensorBatches(images, torch.arange(N), B, shuffle=True, drop_last=True, seed=3, augment=augment)
        part.shard(rank, world_size)
        part.set_epoch(2, start_batch=start)
        assert len(part) == N // B
        for step, (x, y) in enumerate(part, start):
            assert len(y) == len(range(rank, B, world_size))  # rows r, r + w, ...: at most one row apart
            steps.setdefault(step, {}).update({label: image for label, image in zip(y.tolist(), x)})
    return steps


def test_a_global_step_is_the_same_examples_and_crops_on_any_number_of_workers_and_after_a_resize():
    reference = _epoch(1)
    assert sorted(reference) == list(range(N // B)) and all(len(s) == B for s in reference.values())
    for before, after, at in [(2, 3, 2), (3, 1, 1), (5, 2, 4), (4, 4, 0), (1, 5, 3)]:
        resized = {**{s: v for s, v in _epoch(before).items() if s < at}, **_epoch(after, start=at)}
        assert sorted(resized) == sorted(reference)  # every step once: nothing skipped, nothing repeated
        for step, rows in reference.items():
            assert rows.keys() == resized[step].keys(), (before, after, step)
            assert all(torch.equal(rows[label], resized[step][label]) for label in rows)  # the same crop and flip
    other = TensorBatches(torch.zeros(N, 3, 8, 8, dtype=torch.uint8), torch.arange(N), B, shuffle=True, drop_last=True,
                          seed=3)
    other.set_epoch(3)
    assert set(next(iter(other))[1].tolist()) != set(reference[0])  # positive control: another epoch differs


@pytest.mark.parametrize("rows, before, after", [(6, 2, 3), (7, 2, 3), (7, 3, 1), (5, 1, 4)])
def test_per_example_state_is_recut_by_rows_and_round_trips(rows, before, after):
    whole = torch.randn(rows, 2, 3)
    states = [{"delta": whole[r::before].clone(), "step": torch.tensor(5.0)} for r in range(before)]
    recut = [reshard_rows(states, ("delta",), r, after) for r in range(after)]
    for r, state in enumerate(recut):
        assert torch.equal(state["delta"], whole[r::after]) and state["step"] == 5.0
    back = [reshard_rows(recut, ("delta",), r, before)["delta"] for r in range(before)]
    assert all(torch.equal(b, whole[r::before]) for r, b in enumerate(back))
    assert "delta" not in reshard_rows([{"delta": whole}, {}], ("delta",), 0, 1)  # a rank without it: none


def _uneven_worker(rank, method_name, weighted, result_dir):
    """3 ranks on a global batch of 8: rows 3, 3 and 2."""
    torch.set_num_threads(1)  # three processes on a small machine
    with gloo_group(rank, 3, result_dir):
        torch.manual_seed(0)
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        rows = slice(rank, None, 3)
        weight = len(range(8)[rows]) * 3 / 8
        if weighted:
            ddp.register_comm_hook(weight, weighted_mean_hook)
        method = METHODS[method_name](ddp, torch.optim.SGD(model.parameters(), lr=0.5), 0.1,
                                      METHODS[method_name].Options())
        method.rank_weight = weight if weighted else 1.0
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        for _ in range(2):
            method.step(x[rows], y[rows])
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{result_dir}/{rank}.pt")
        del method, ddp  # DDP's reducer holds the group: release it before the group is destroyed


def _full_batch(method_name):
    torch.manual_seed(0)
    model = _model()
    method = METHODS[method_name](model, torch.optim.SGD(model.parameters(), lr=0.5), 0.1,
                                  METHODS[method_name].Options())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    for _ in range(2):
        method.step(x, y)
    return model.state_dict()


def test_ranks_with_unequal_rows_train_as_the_full_batch(tmp_path):
    """Natural training (DDP's all-reduce, weighted by the comm hook) equals the full batch on one
    process. Positive control: DDP's plain mean of the ranks' means does not."""
    reference = _full_batch("natural")
    for weighted in (True, False):
        out = tmp_path / f"weighted-{weighted}"
        out.mkdir()
        mp.spawn(_uneven_worker, args=("natural", weighted, str(out)), nprocs=3, join=True)
        ranks = [torch.load(f"{out}/{r}.pt") for r in range(3)]
        for key in reference:
            torch.testing.assert_close(ranks[0][key], ranks[2][key], rtol=0, atol=1e-6)
        close = all(torch.allclose(ranks[0][k], reference[k], rtol=1e-5, atol=1e-6) for k in reference)
        assert close == weighted


class NoticeAt(Group):
    """A group that receives a preemption notice at its n-th check, as Ray's would."""

    def __init__(self, notice_at_check: int):
        self.notice_at_check, self.checks = notice_at_check, 0

    def preempted(self) -> bool:
        self.checks += 1
        return self.checks == self.notice_at_check


def test_a_preemption_notice_checkpoints_at_once_and_the_run_resumes_from_it(tmp_path, monkeypatch, caplog):
    """Notice at step 4 of epoch 2 (checks every 2 steps; no periodic checkpoints), the node
    gone 3 steps later: the rerun resumes at step 4 of epoch 2 and ends
    bit for bit where an uninterrupted run ends."""
    cfg = quick_config(**{"train.preemption_check_steps": 2})
    cfg.data.batch_size = 32  # 8 steps an epoch
    trainer.fit(cfg, tmp_path / "straight", progress=False)

    out, steps = tmp_path / "preempted", CountedSteps(monkeypatch, trainer.METHODS[cfg.train.method])
    # Checks at steps 2, 4, 6 of epoch 1 (not at its last step, where the epoch's checkpoint
    # follows), then at epoch 2's step 2 (the 4th) and 4 (the 5th); the node goes 3 steps later.
    steps.kill_at = 8 + 4 + 3
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg, out, group=NoticeAt(notice_at_check=5), progress=False)
    ckpt = Checkpoint(out / "last.safetensors")
    assert ckpt.meta["epoch"] == 1 and ckpt.meta["epoch_progress"]["steps"] == 4
    steps.run, steps.kill_at = 0, None
    with caplog.at_level("INFO", logger="atcd_ray"):
        trainer.fit(cfg, out, progress=False)
    assert any("after epoch 1, step 4 of epoch 2" in r.getMessage() for r in caplog.records)
    assert steps.run == (8 - 4) + 8
    _assert_same(tmp_path / "straight", out)


# 10 epochs (about 3 s each on two workers): after the preemption notice a run keeps training until
# Ray restarts it off the drained node (its deadline is 4 s), and with 4 epochs the run could end
# first, leaving nothing for the one-worker group to do.
ELASTIC = {"train.method": "free", "methods.free.replays": 8, "model": "smallcnn", "train.epochs": 10,
           "data.subset": 640, "data.batch_size": 32, "train.checkpoint_steps": 4, "train.preemption_check_steps": 1,
           "eval.n": 64, "train.val_n": 64, "eval.attacks": ["fgsm"], "train.val_attack": "fgsm"}


def _cluster_run(out: str) -> None:
    """On a local Ray cluster of a head (no CPUs) and two 1-CPU nodes, an elastic run (1-2
    workers) loses a node abruptly, goes on with one worker, grows back onto a node added
    later, is preempted there (a real drain with a deadline, as a cloud's reclaim notice reaches
    Ray), shrinks again and finishes. Writes what it did to OUT/events.json."""
    import json
    import threading
    import time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from atcd_ray.config import load_config
    from atcd_ray.distributed import fit_distributed

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address,
             runtime_env={"worker_process_setup_hook": "tests.ray_timers.coordinator_ticks_every_second"})
    cfg = load_config("digits", overrides=list(ELASTIC.items()))
    errors, events = [], []

    def committed() -> dict:
        """The meta of the latest checkpoint Ray has committed (rank 0 writes the run directory's
        last.safetensors before every rank's part has reached Ray: that one may not count)."""
        snapshot = Path(out) / "checkpoint_manager_snapshot.json"
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
            return Checkpoint(Path(out) / latest / "last.safetensors").meta
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def train():
        try:
            fit_distributed(cfg, out, workers=(1, 2), cpus_per_worker=1, max_failures=3, progress=False,
                            resize_check_seconds=2)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            errors.append(repr(err))

    def wait_for(what, predicate, timeout=600):
        start = time.time()
        while time.time() - start < timeout and thread.is_alive():
            meta = committed()
            if predicate(meta):
                events.append({"event": what, "epoch": meta["epoch"], "seconds": round(time.time() - began, 1),
                               "step": meta.get("epoch_progress", {}).get("steps", 0)})
                return
            time.sleep(0.2)
        ended = "the run ended first" if not thread.is_alive() else f"not within {timeout} s"
        raise TimeoutError(f"{what}: {ended} (errors: {errors})")

    began = time.time()
    thread = threading.Thread(target=train)
    thread.start()
    try:
        wait_for("two workers checkpointed inside an epoch",
                 lambda m: m.get("world_size") == 2 and "epoch_progress" in m)
        cluster.remove_node(nodes[1], allow_graceful=False)  # its raylet and workers killed
        wait_for("one worker checkpointed", lambda m: m.get("world_size") == 1)
        nodes.append(cluster.add_node(num_cpus=1))
        wait_for("grown back to two workers", lambda m: m.get("world_size") == 2)
        accepted, _ = ray._raylet.GcsClient(address=cluster.address).drain_node(
            nodes[2].node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim",
            int(time.time() * 1000) + 4000)
        assert accepted
        wait_for("checkpointed on the preemption notice", lambda m: m.get("preemption_notices") == 1)
        wait_for("one worker after the preemption", lambda m: m.get("world_size") == 1)
        cluster.remove_node(nodes[2], allow_graceful=False)  # the reclaim
    finally:
        thread.join()
        Path(out, "events.json").write_text(json.dumps({"events": events, "errors": errors}))
        ray.shutdown()
        cluster.shutdown()


def test_an_elastic_run_survives_node_loss_and_preemption_on_a_multi_node_cluster(tmp_path):
    import json
    import subprocess
    import sys

    from tests.test_distributed import ROOT, _env

    out = tmp_path / "elastic"
    # After a node is lost (or preempted) Ray Train may size the next group on a view of the
    # cluster that still holds the node's CPUs (tests/ray_timers.py): that group's placement group
    # then waits for the startup timeout (60 s by default) before the controller retries with one
    # worker. Only the placement group's wait is timed, and a timed-out start is retried, so the run
    # is the same with a short one (the test took 3.5 minutes with the default).
    env = dict(_env(), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5")
    subprocess.run([sys.executable, "-c", f"from tests.test_elastic import _cluster_run; _cluster_run({str(out)!r})"],
                   env=env, cwd=ROOT, check=True, timeout=1200)
    done = json.loads((out / "events.json").read_text())
    assert not done["errors"] and [e["event"] for e in done["events"]][-1] == "one worker after the preemption"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(history) == 10 and summary["epochs"] == 10 and summary["preemption_notices"] == 1
    # Data accounting: every epoch's stretches start at step 0 and go forward; over the run the
    # worker count went 2, 1 (node lost), 2 (node added), 1 (preempted).
    stretches = [(record["epoch"], first, workers)
                 for record in history for first, workers in record["train_stretches"]]
    for record in history:
        firsts = [first for first, _ in record["train_stretches"]]
        assert firsts[0] == 0 and firsts == sorted(set(firsts)) and firsts[-1] < 640 // 32
    sizes = [workers for _, _, workers in stretches]
    assert [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]] == [2, 1, 2, 1], stretches
    # Only the steps after the last committed checkpoint before the kill were run again: the
    # one-worker stretch starts there.
    killed = done["events"][0]
    first_single = next((epoch, first) for epoch, first, workers in stretches if workers == 1)
    assert first_single[0] == killed["epoch"] + 1 and 0 <= first_single[1] - killed["step"] <= 4


def test_a_resume_may_change_how_often_it_checkpoints_but_not_what_it_trains(tmp_path):
    import json

    from atcd_ray.config import ConfigError

    cfg = quick_config()
    old = json.loads(cfg.to_json())
    del old["train"]["preemption_check_steps"]  # a run checkpointed before the key existed
    old["train"]["checkpoint_steps"] = 7
    run_dir.check_same_config(tmp_path / "last.safetensors", old, cfg)
    old["optim"]["lr"] = 1.0  # positive control: what it trains may not change
    with pytest.raises(ConfigError, match="optim.lr"):
        run_dir.check_same_config(tmp_path / "last.safetensors", old, cfg)
