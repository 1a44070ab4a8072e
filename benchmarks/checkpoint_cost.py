"""What a mid-epoch checkpoint costs: seconds per checkpoint write (weights, optimiser, method
state, RNG, epoch position; tmp + fsync + rename, the previous one kept), beside the seconds of the
training steps between two checkpoints at ``--every`` steps, for a recipe's network and method.

    python benchmarks/checkpoint_cost.py --dataset fashion-mnist --recipe pipelines/fashion-mnist_smallcnn.yaml \
        --every 100
    python benchmarks/checkpoint_cost.py --dataset cifar10 --every 100 --batch-size 64

Generated batches of the dataset's shape; median of ``--rounds`` interleaved rounds of one write
and ``--steps`` training steps. The share is write / (write + every x step).
"""
import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from atcd_ray.config import load_config, parse_override
from atcd_ray.core.checkpoint import save_checkpoint
from atcd_ray.core.engine import EpochProgress
from atcd_ray.core.methods import METHODS
from atcd_ray.data import DATASETS
from atcd_ray.factories import build_optimizer, model_for
from atcd_ray.provenance import hardware


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--recipe", help="a recipe YAML (default: the dataset's)")
    p.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--steps", type=int, default=5, help="training steps timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", help="directory to write the checkpoints in (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.dataset, args.recipe, [parse_override(s) for s in args.set])
    spec = DATASETS[cfg.dataset]
    batch = args.batch_size or cfg.data.batch_size
    torch.manual_seed(0)
    model = model_for(cfg, spec)
    optimizer = build_optimizer(cfg, model)
    method = METHODS[cfg.train.method](model, optimizer, cfg.eps, cfg.method_options)
    x = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size)
    y = torch.randint(0, spec.num_classes, (batch,))
    method.step(x, y)  # warm-up; also fills the optimiser's and the method's state
    progress = dataclasses.asdict(EpochProgress(steps=1, images=batch, totals={"loss": 1.0}))
    writes, steps = [], []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        path = Path(tmp) / "last.safetensors"
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            save_checkpoint(path, model, config=cfg.to_dict(), meta={"epoch": 0, "epoch_progress": progress},
                            optimizer=optimizer,
                            method_state=method.state_dict(), rng_state=torch.get_rng_state(), keep_previous=True)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                method.step(x, y)
            steps.append((time.perf_counter() - t0) / args.steps)
        size = path.stat().st_size
    write, step = statistics.median(writes), statistics.median(steps)
    print(f"{cfg.dataset} {cfg.model} {cfg.train.method}, batch {batch}; hardware: {hardware()}")
    print(f"checkpoint {size / 2**20:.1f} MiB: {write * 1000:.1f} ms a write; a training step {step * 1000:.1f} ms; "
          f"every {args.every} steps: {100 * write / (write + args.every * step):.2f}% of the time")


if __name__ == "__main__":
    main()
