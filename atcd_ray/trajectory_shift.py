"""``python -m atcd_ray.trajectory_shift DATASET``: the paper's trajectory shift (Definition 5.1, Eq. 15).

Two copies of the model start from the same seed and initial weights and see the same minibatches.
Copy A runs ATCD with trajectories of K steps and T replays, copy B with K' steps and floor(T K / K')
replays, so both spend the same number of trajectory steps per minibatch. For every minibatch the
weight gradients of each copy's updates are averaged over its replays, per layer, and compared:
the L2 norm of the difference and the cosine similarity. Each copy draws its random numbers from
its own stream, forked from the same seed. Writes DIR/trajectory_shift.json, .md and .png
(the paper's Figure 1).

    python -m atcd_ray.trajectory_shift fashion-mnist --k 2 --k-prime 10 --T 4 --epochs 1 --subset 5000
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from copy import deepcopy
from pathlib import Path

import torch

from .cli import ArgumentParser, run_main, setup_logging
from .config import ConfigError, load_config, parse_override
from .core.checkpoint import write_json_atomic, write_text_atomic
from .core.methods import ATCD
from .data import build_splits
from .factories import build_optimizer, model_for, seed_everything


class GradientAverager:
    """Sums each weight's gradient at every optimiser step of one minibatch (Eq. 15's inner means)."""

    def __init__(self, model, optimizer):
        self.named = [(name, p) for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1]
        self.sums, self.count = {}, 0
        optimizer.register_step_pre_hook(self._record)

    def _record(self, *args):
        for name, p in self.named:
            self.sums[name] = self.sums.get(name, 0) + p.grad.detach().clone()
        self.count += 1

    def pop_mean(self) -> dict[str, torch.Tensor]:
        mean = {name: total / self.count for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return mean


def measure(cfg, *, k: int, k_prime: int, replays: int, epochs: int, device=torch.device("cpu"),
            same_weights: bool = False) -> dict:
    """``same_weights``: before every minibatch, copy B takes copy A's weights, optimiser state,
    chain state and random stream, so the two gradients differ only by the trajectory length
    (copy A trains, copy B is a probe). Otherwise each copy trains on its own, as Eq. 15 reads."""
    d = cfg.data
    splits = build_splits(cfg.dataset, data_dir=d.dir, batch_size=d.batch_size, val_size=d.val_size, subset=d.subset,
                          eval_n=1, val_n=1, seed=cfg.seed, loader_workers=d.loader_workers)
    copies = []
    for trajectory, t in [(k, replays), (k_prime, max(1, replays * k // k_prime))]:
        seed_everything(cfg.seed, device)  # the same initial weights and random stream
        model = model_for(cfg, splits.spec).to(device)
        optimizer = build_optimizer(cfg, model)
        options = dataclasses.replace(cfg.methods["atcd"], T=t, K=trajectory)
        copies.append({"method": ATCD(model, optimizer, cfg.eps, options), "grads": GradientAverager(model, optimizer),
                       "rng": torch.get_rng_state(), "T": t, "K": trajectory})
    layers = [name for name, _ in copies[0]["grads"].named]
    l2 = {name: [] for name in layers}
    cosine = {name: [] for name in layers}
    for epoch in range(epochs):
        splits.train.set_epoch(epoch)
        for x, y in splits.train:
            x, y = x.to(device), y.to(device)
            if same_weights:
                probe, lead = copies[1]["method"], copies[0]["method"]
                probe.model.load_state_dict(lead.model.state_dict())
                # A deep copy: load_state_dict keeps the tensors it is given, and the two copies'
                # momentum buffers would be one tensor, updated twice per step.
                probe.optimizer.load_state_dict(deepcopy(lead.optimizer.state_dict()))
                probe.load_state_dict({k: t.clone() for k, t in lead.state_dict().items()})
                copies[1]["rng"] = copies[0]["rng"]
            means = []
            for copy in copies:
                torch.set_rng_state(copy["rng"])
                copy["method"].step(x, y)
                copy["rng"] = torch.get_rng_state()
                means.append(copy["grads"].pop_mean())
            for name in layers:
                a, b = means[0][name].flatten(), means[1][name].flatten()
                l2[name].append((a - b).norm().item())
                cosine[name].append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    return {"k": k, "k_prime": k_prime, "same_weights": same_weights, "T": copies[0]["T"], "T_prime": copies[1]["T"], "layers": layers,
            "l2": l2, "cosine": cosine, "steps": len(l2[layers[0]]) if layers else 0}


def markdown(result: dict) -> str:
    lines = [f"Trajectory shift, K = {result['k']} (T = {result['T']}) against K' = {result['k_prime']} "
             f"(T' = {result['T_prime']}), over {result['steps']} minibatches"
             + (", both from copy A's weights at every minibatch." if result.get("same_weights") else
                ", each copy training on its own."), "",
             "| layer | mean L2 difference | mean cosine similarity | cosine, last 10% |", "|---|---|---|---|"]
    for name in result["layers"]:
        l2, cos = result["l2"][name], result["cosine"][name]
        tail = cos[-max(1, len(cos) // 10):]
        lines.append(f"| {name} | {sum(l2) / len(l2):.4g} | {sum(cos) / len(cos):.3f} | {sum(tail) / len(tail):.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from .figures import pyplot, save_figure

    fig, (ax_l2, ax_cos) = pyplot().subplots(1, 2, figsize=(11, 4))
    for name in result["layers"]:
        ax_l2.plot(result["l2"][name], label=name, linewidth=0.8)
        ax_cos.plot(result["cosine"][name], label=name, linewidth=0.8)
    ax_l2.set(title="L2 difference of averaged gradients", xlabel="minibatch", yscale="log")
    ax_cos.set(title="cosine similarity", xlabel="minibatch", ylim=(-1.05, 1.05))
    ax_cos.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Trajectory shift: K = {result['k']} vs K' = {result['k_prime']}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m atcd_ray.trajectory_shift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--k-prime", type=int, default=10)
    p.add_argument("--T", type=int, default=4, help="replays of the K copy; the K' copy gets floor(T K / K')")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--subset", type=int)
    p.add_argument("--recipe")
    p.add_argument("--same-weights", action="store_true",
                   help="start copy B from copy A's weights and chain at every minibatch (length effect only)")
    p.add_argument("--out", default="runs/trajectory-shift")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if min(args.k, args.k_prime, args.T, args.epochs) < 1:
        raise ConfigError("--k, --k-prime, --T and --epochs must be >= 1")
    overrides = [("train.method", "atcd")] + ([("data.subset", args.subset)] if args.subset else [])
    cfg = load_config(args.dataset, args.recipe, overrides + [parse_override(s) for s in args.set])
    setup_logging()
    result = measure(cfg, k=args.k, k_prime=args.k_prime, replays=args.T, epochs=args.epochs,
                     same_weights=args.same_weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "trajectory_shift.json", result, indent=None)
    write_text_atomic(out / "trajectory_shift.md", markdown(result))
    plot(result, out / "trajectory_shift.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
