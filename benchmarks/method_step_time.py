"""Time per minibatch of every method, measured side by side (interleaved rounds) in one process.

    python benchmarks/method_step_time.py [--rounds 5] [--steps 10] [--batch-size 128]
    python benchmarks/method_step_time.py --model preactresnet18 [--atcd 2x1,4x2] [--batch-size 64]

``--model smallcnn`` (default): Fashion-MNIST minibatches, SmallCNN, eps 0.1, every method with the
SmallCNN recipe's options (pipelines/fashion-mnist_smallcnn.yaml, not the dataset's default).
``--model preactresnet18``: CIFAR-shaped generated minibatches (3x32x32, random labels),
PreActResNet18 (BatchNorm), eps 8/255, the CIFAR-10 recipe; natural and the ATCD configurations
only. Each round runs ``--steps`` minibatches of every method in turn on the same batches; the
median over rounds of each method's time is reported, with its ratio to natural training, so that
machine noise hits every method alike.

For each ATCD configuration ``TxK`` of ``--atcd`` a row ``bare-atcd-TxK`` is a plain PyTorch loop
doing that configuration's forward and backward passes (T replays of K input-gradient passes
and one training pass) with none of its bookkeeping, in particular no M-H correction: ATCD /
bare is what the method costs beyond its passes (target at most 1.05).
"""
import argparse
import statistics
import time

import torch
from bare import BareLoop

from atcd_ray.config import RECIPES_DIR, load_config, parse_override
from atcd_ray.core.methods import METHODS
from atcd_ray.factories import build_optimizer, model_for
from atcd_ray.provenance import hardware
from atcd_ray.data import DATASETS, build_splits


def generated_batches(n: int, batch_size: int, shape: tuple[int, ...]) -> list:
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(batch_size, *shape, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
            for _ in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smallcnn", "preactresnet18"], default="smallcnn")
    p.add_argument("--atcd", default=None, help="ATCD configurations TxK, comma-separated "
                   "(default: the recipe's for smallcnn; 2x1,4x2 for preactresnet18)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (smallcnn), 64 (preactresnet18)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every method, e.g. methods.atcd.tau=0.02 (more M-H rejections)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.model == "smallcnn":
        dataset, batch_size = "fashion-mnist", args.batch_size or 128
        recipe = RECIPES_DIR / "fashion-mnist_smallcnn.yaml"
        batches = list(build_splits(dataset, data_dir=None, batch_size=batch_size, val_size=5000,
                                    subset=batch_size * args.steps, eval_n=None, val_n=None, seed=0).train)
        names, atcd = [n for n in METHODS if n != "atcd"], args.atcd
    else:
        dataset, batch_size, recipe = "cifar10", args.batch_size or 64, None  # the dataset's recipe
        batches = generated_batches(args.steps, batch_size, (3, 32, 32))
        names, atcd = ["natural"], args.atcd or "2x1,4x2"

    def config(method, overrides=()):
        return load_config(dataset, recipe, [("train.method", method), ("model", args.model), *overrides,
                                             *map(parse_override, args.set)])

    methods, options = {}, {}
    for label, method, cls, overrides in [(n, n, METHODS[n], ()) for n in names] + [
            row for tk in (atcd.split(",") if atcd else [None]) for row in _atcd_rows(tk)]:
        cfg = config(method, overrides)
        torch.manual_seed(0)
        model = model_for(cfg, DATASETS[dataset])
        methods[label] = cls(model, build_optimizer(cfg, model), cfg.eps, cfg.method_options)
        options[label] = cfg.method_options
        methods[label].step(*batches[0])  # warm-up
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            for x, y in batches:
                stats = method.step(x, y)
            times[name].append((time.perf_counter() - start) / len(batches))
            if "mh_accept_rate" in stats:
                options[name].last_accept = float(stats["mh_accept_rate"])
    base = statistics.median(times["natural"])
    print(f"model {args.model}, batch {batch_size}, {args.steps} steps x {args.rounds} rounds; hardware: {hardware()}")
    for name in methods:
        if name.startswith("bare-"):
            ratio = statistics.median(times[name[5:]]) / statistics.median(times[name])
            print(f"{name[5:]} / {name}: {ratio:.3f} (M-H acceptance in the last step "
                  f"{getattr(options[name[5:]], 'last_accept', float('nan')):.3f})")
    print("| method | options | ms per minibatch | x natural | images/s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        opts = {k: v for k, v in vars(options[name]).items() if k != "last_accept"}
        desc = ", ".join(f"{k}={v}" for k, v in opts.items()) if opts else "-"
        print(f"| {name} | {desc} | {1000 * med:.1f} | {med / base:.2f} | {batch_size / med:.0f} |")


def _atcd_rows(tk):
    """(label, method, class, overrides) of ATCD at TxK (None: the recipe's) and its bare loop."""
    overrides = [] if tk is None else [("methods.atcd.T", int(tk.split("x")[0])), ("methods.atcd.K", int(tk.split("x")[1]))]
    label = "atcd" if tk is None else f"atcd-{tk}"
    return [(label, "atcd", METHODS["atcd"], overrides), (f"bare-{label}", "atcd", _bare_atcd, overrides)]


def _bare_atcd(model, optimizer, eps, options):
    return BareLoop(model, optimizer, eps, options.T, options.K - 1 if options.reuse_grad else options.K)


if __name__ == "__main__":
    main()
