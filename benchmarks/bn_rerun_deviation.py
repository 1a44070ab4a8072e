"""How far ATCD's update after an M-H rejection is from the exact re-run, on PreActResNet18.

    python benchmarks/bn_rerun_deviation.py [--batch 64] [--rejected 4,8] [--seeds 0,1] [--train-steps 0]

The update needs the logits at the corrected chain (rejected rows reverted). Routes compared with
the exact whole-minibatch re-run (``mh_rerun = batch``), by the relative L2 distance of the weight
gradient and the relative difference of the loss:
  rows       the default: rejected rows re-run with the recorded batch statistics, differentiable
  constants  the same with the statistics as constants (the design rejected in ALGORITHM_NOTES.md)
  none       no correction: the update trains on the proposal
CIFAR-shaped images with class structure (a class prototype plus noise), two independent uniform
starts for the start and the proposal; ``--train-steps`` natural steps first.
"""
import argparse
import copy

import torch
import torch.nn.functional as F

from atcd_ray.core.batchnorm import BatchStatistics
from atcd_ray.core.methods.atcd import ATCD, ATCDOptions, Chain
from atcd_ray.core.models import build_model
from atcd_ray.core.threat import uniform_start

EPS = 8 / 255


class ConstantStatistics(BatchStatistics):
    @staticmethod
    def _moments(layer, x, output):
        return tuple(t.detach() for t in BatchStatistics._moments(layer, x, output))


def data(n, gen):
    y = torch.randint(0, 10, (n,), generator=gen)
    prototypes = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return (0.7 * prototypes[y] + 0.3 * torch.rand(n, 3, 32, 32, generator=gen)).clamp(0, 1), y


def update(model, x, y, start, proposal, rejected, route):
    model = copy.deepcopy(model)
    method = ATCD(model, torch.optim.SGD(model.parameters(), lr=0.1), EPS,
                  ATCDOptions(mh_rerun="batch" if route == "exact" else "rows"))
    if route == "constants":
        method.batch_stats = ConstantStatistics(model)
    x_adv, logits = method._forward(x, Chain(proposal, proposal))
    if route != "none":
        corrected = torch.where(rejected[:, None, None, None], start, proposal)
        logits, _ = method._rerun(x_adv, corrected - proposal, rejected, logits)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rejected", default="4,8")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-steps", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, 3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(args.train_steps):
        x, y = data(32, gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    print(f"PreActResNet18, batch {args.batch}, {args.train_steps} training steps first")
    print("| rejected | seed | route | loss, relative difference | weight gradient, relative L2 distance |")
    print("|---|---|---|---|---|")
    for n in map(int, args.rejected.split(",")):
        for seed in map(int, args.seeds.split(",")):
            torch.manual_seed(seed)
            x, y = data(args.batch, gen)
            start, proposal = uniform_start(x, EPS), uniform_start(x, EPS)
            rejected = torch.zeros(args.batch, dtype=torch.bool)
            rejected[torch.randperm(args.batch)[:n]] = True
            exact_loss, exact = update(model, x, y, start, proposal, rejected, "exact")
            for route in ("rows", "constants", "none"):
                loss, grad = update(model, x, y, start, proposal, rejected, route)
                print(f"| {n} | {seed} | {route} | {abs(loss - exact_loss) / abs(exact_loss):.1e} | "
                      f"{((grad - exact).norm() / exact.norm()).item():.3f} |")


if __name__ == "__main__":
    main()
