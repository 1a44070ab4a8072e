"""``python -m atcd_ray.evaluate CHECKPOINT``: clean and robust accuracy of a trained model.

    python -m atcd_ray.evaluate runs/atcd/last.safetensors --attacks pgd20,mifgsm20,cw20,tapgd20

Attacks: fgsm, pgdN, pgdNxR (R restarts), mifgsmN, cwN (PGD on the CW margin), tapgdN
(torchattacks' PGD, independent of this project), hmc[N] (the paper's HMC attack, N proposals,
default 20), autoattack (standard, the authors' code), square[Q] and rays[Q] (gradient-free, Q
queries, default 5000 and 10000). Step eps/4. If a gradient-free attack beats every gradient attack
by more than 3 points, the output says that the model likely masks gradients (give at least 1000
queries: tests/test_robustness.py shows square1000 flag an input-quantised network on 100 images).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import load_model
from .cli import ArgumentParser, markdown_table, run_main
from .config import ConfigError, config_from_dict
from .core.attacks import build_attack
from .core.checkpoint import Checkpoint
from .core.engine import evaluate
from .data import DATASETS, build_splits


MASKING_MARGIN = 0.03
GRADIENT_FREE = ("square", "rays")


def masking_suspected(robust_acc: dict[str, float]) -> bool:
    """True when a gradient-free attack finds markedly lower accuracy than every gradient attack."""
    free = [acc for name, acc in robust_acc.items() if name.startswith(GRADIENT_FREE)]
    gradient = [acc for name, acc in robust_acc.items() if not name.startswith(GRADIENT_FREE)]
    return bool(free and gradient) and min(free) < min(gradient) - MASKING_MARGIN


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--dataset", help="default: the checkpoint's")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--attacks", default="pgd20,mifgsm20,cw20", help="comma-separated attack names")
    p.add_argument("--eps", type=float, help="default: the checkpoint's training eps")
    p.add_argument("--alpha", type=float, help="attack step size (default eps/4)")
    p.add_argument("--eval-n", type=int, help="first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ckpt = Checkpoint(args.checkpoint)
    cfg = config_from_dict(ckpt.config)
    dataset = args.dataset or cfg.dataset
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    eps = cfg.eps if args.eps is None else args.eps
    if not 0 <= eps < math.inf or (args.eval_n is not None and args.eval_n <= 0) or args.batch_size <= 0:
        raise ConfigError("--eps must be a finite number >= 0, --eval-n and --batch-size > 0")
    trained, asked = DATASETS[cfg.dataset], DATASETS[dataset]
    shape = lambda spec: (spec.in_channels, spec.image_size, spec.num_classes)  # noqa: E731
    if shape(trained) != shape(asked):
        raise ConfigError(f"--dataset {dataset}: {args.checkpoint} is a {cfg.model} for {cfg.dataset} "
                          f"({trained.in_channels}x{trained.image_size}x{trained.image_size} images, "
                          f"{trained.num_classes} classes), not for {dataset} ({asked.in_channels}x"
                          f"{asked.image_size}x{asked.image_size}, {asked.num_classes} classes)")
    try:
        attacks = {name: build_attack(name, eps, args.alpha) for name in args.attacks.split(",") if name}
    except ValueError as err:
        raise ConfigError(f"--attacks: {err}") from None

    from .data.sources import check_available

    check_available(dataset, args.data_dir or cfg.data.dir)

    import torch

    from .trainer import provenance

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint).to(device)
    test = build_splits(dataset, args.data_dir or cfg.data.dir, args.batch_size, 0, None, args.eval_n, None,
                        args.seed, cfg.data.loader_workers).test
    start = time.perf_counter()
    accuracy = evaluate(model, test, attacks, device, progress=True)
    result = {"checkpoint": str(args.checkpoint), "dataset": dataset, "eps": eps, "method": cfg.train.method,
              "n": test.num_examples,
              "clean_acc": accuracy["clean"], "robust_acc": {name: accuracy[name] for name in attacks},
              "seconds": time.perf_counter() - start, "provenance": provenance()}
    result["gradient_masking_suspected"] = masking_suspected(result["robust_acc"])
    print(markdown_table([{"model": Path(args.checkpoint).parent.name, "clean": accuracy["clean"],
                           **result["robust_acc"]}], ["model", "clean", *attacks]))
    if result["gradient_masking_suspected"]:
        print(f"WARNING: a gradient-free attack beats the gradient attacks by more than {MASKING_MARGIN:.0%}: "
              "the model likely masks gradients, and its gradient-based robust accuracy overstates robustness")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
