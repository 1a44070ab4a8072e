"""What asking Ray for a preemption notice costs, and what reporting a checkpoint to Ray costs, in
a Ray Train worker group on this machine: the two things a run does under Ray on top of the
in-process checkpoint write (``benchmarks/checkpoint_cost.py``).

    python benchmarks/preemption_check_cost.py --workers 1 2 --calls 200 --mib 3.2

``ray.train.get_preemption_info()`` is a collective (rank 0's answer broadcast through Ray), which
the trainer calls every ``train.preemption_check_steps`` steps; ``ray.train.report`` with a
checkpoint of ``--mib`` MiB per rank (SmallCNN's mid-epoch checkpoint is 3.2 MiB) is what each
checkpoint adds under Ray. Median seconds per call over ``--calls`` calls (reports: ``--reports``,
``--gap`` seconds apart: Ray holds one unconsumed report per worker, so back-to-back reports wait
for the controller's poll instead), with a local Ray of this machine's CPUs.
"""
import argparse
import json
import os
import statistics
import tempfile
import time


def _loop(config):
    import ray.train

    ask = []
    for _ in range(config["calls"]):
        start = time.perf_counter()
        ray.train.get_preemption_info()
        ask.append(time.perf_counter() - start)
    report = []
    with tempfile.TemporaryDirectory() as staging:
        with open(os.path.join(staging, "state.bin"), "wb") as f:
            f.write(os.urandom(int(config["mib"] * 2**20)))
        for i in range(config["reports"]):
            time.sleep(config["gap"])  # training between checkpoints: Ray's one-report queue has drained
            start = time.perf_counter()
            ray.train.report({"i": i}, checkpoint=ray.train.Checkpoint.from_directory(staging))
            report.append(time.perf_counter() - start)
    if ray.train.get_context().get_world_rank() == 0:
        print("RESULT " + json.dumps({"ask": statistics.median(ask), "report": statistics.median(report)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--reports", type=int, default=10)
    p.add_argument("--mib", type=float, default=3.2)
    p.add_argument("--gap", type=float, default=3.0, help="seconds between two reports (the training between)")
    args = p.parse_args()

    import ray
    import ray.train.torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig

    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    with tempfile.TemporaryDirectory() as storage:
        for workers in args.workers:
            trainer = ray.train.torch.TorchTrainer(
                _loop, train_loop_config={"calls": args.calls, "reports": args.reports, "mib": args.mib,
                                                  "gap": args.gap},
                scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"w{workers}", storage_path=storage,
                                     checkpoint_config=CheckpointConfig(num_to_keep=1)))
            start = time.perf_counter()
            trainer.fit()
            print(f"workers={workers}: done in {time.perf_counter() - start:.1f} s (RESULT line above)", flush=True)


if __name__ == "__main__":
    main()
