"""Time per minibatch of every method, measured side by side (interleaved rounds) in one process.

    python benchmarks/method_step_time.py [--rounds 5] [--steps 10] [--batch-size 128]

Each round runs ``--steps`` minibatches of every method in turn on the same Fashion-MNIST batches
(SmallCNN, eps 0.1, the recipe's options); the median over rounds of each method's time is
reported, with its ratio to natural training, so that machine noise hits every method alike.
The row ``bare-atcd`` is a plain PyTorch loop doing ATCD's forward and backward passes (T replays
of K - 1 input-gradient passes, when reusing the update's gradient, and one training pass) with
none of its bookkeeping: ATCD / bare-atcd is the engine's overhead (target at most 1.05).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from atcd_ray.config import load_config
from atcd_ray.core.methods import METHODS
from atcd_ray.trainer import build_optimizer, hardware, model_for
from atcd_ray.data import build_splits


def bare_atcd(model, optimizer, eps, options):
    """ATCD's passes without ATCD: a sign step on the input gradient between them."""
    passes = options.K - 1 if options.reuse_grad else options.K

    def step(x, y):
        delta = torch.empty_like(x).uniform_(-eps, eps)
        for _ in range(options.T):
            for _ in range(passes):
                x_adv = (x + delta).requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
                delta = (delta + eps * grad.sign()).clamp(-eps, eps)
            x_adv = (x + delta).requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            delta = (delta + eps * x_adv.grad.sign()).clamp(-eps, eps)

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    splits = build_splits("fashion-mnist", None, args.batch_size, 5000, args.batch_size * args.steps, None, None, 0)
    batches = list(splits.train)
    methods = {}
    for name in METHODS:
        cfg = load_config("fashion-mnist", overrides=[("train.method", name)])
        model = model_for(cfg, splits.spec)
        methods[name] = METHODS[name](model, build_optimizer(cfg, model), cfg.eps, cfg.method_options)
        methods[name].step(*batches[0])  # warm-up
    cfg = load_config("fashion-mnist", overrides=[("train.method", "atcd")])
    model = model_for(cfg, splits.spec)
    bare = type("Bare", (), {"step": staticmethod(bare_atcd(model, build_optimizer(cfg, model), cfg.eps,
                                                              cfg.method_options))})
    methods["bare-atcd"] = bare
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            for x, y in batches:
                method.step(x, y)
            times[name].append((time.perf_counter() - start) / len(batches))
    base = statistics.median(times["natural"])
    print(f"atcd / bare-atcd: {statistics.median(times['atcd']) / statistics.median(times['bare-atcd']):.3f}")
    print(f"hardware: {hardware()}; batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds")
    print("| method | options | ms per minibatch | x natural | images/s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        opts = load_config("fashion-mnist", overrides=[("train.method", "atcd" if name == "bare-atcd" else name)]).method_options
        desc = ", ".join(f"{k}={v}" for k, v in vars(opts).items()) if vars(opts) else "-"
        print(f"| {name} | {desc} | {1000 * med:.1f} | {med / base:.2f} | {args.batch_size / med:.0f} |")


if __name__ == "__main__":
    main()
