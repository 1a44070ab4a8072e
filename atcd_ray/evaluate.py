"""``python -m atcd_ray.evaluate CHECKPOINT``: clean and robust accuracy of a trained model.

    python -m atcd_ray.evaluate runs/atcd/last.safetensors --attacks pgd20,mifgsm20,cw20,tapgd20

Attacks: fgsm, pgdN, pgdNxR (R restarts), mifgsmN, cwN (PGD on the CW margin), tapgdN
(torchattacks' PGD, independent of this project), hmc[N] (the paper's HMC attack, N proposals,
default 20), autoattack (standard, the authors' code), square[Q] and rays[Q] (gradient-free, Q
queries, default 5000 and 10000). Step eps/4. If a gradient-free attack beats every gradient attack
by more than 3 points, the output says that the model likely masks gradients (give at least 1000
queries: tests/test_robustness.py shows square1000 flag an input-quantised network on 100 images).

Sharded and resumable: the test examples are cut into batches of --batch-size; batch b's attacks
draw their randomness from the seed (--seed, b) alone, and its per-example results (which
examples each attack broke) are written to --parts-dir as soon as it is done. A rerun of the same
command computes only the batches not yet there, and --workers N spreads the batches over N Ray
actors (each loads the checkpoint and the data once; --gpu gives each a GPU). The result is the
same on any number of workers, and after any number of interruptions, for the same --batch-size.
The merge is per example, so "every attack" (robust to all the attacks asked) is exact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import load_model
from .cli import ArgumentParser, markdown_table, run_main
from .config import ConfigError, config_from_dict
from .core.attacks import build_attack
from .core.checkpoint import Checkpoint, write_text_atomic
from .data import DATASETS, build_splits
from .storage import is_uri, local_copy


MASKING_MARGIN = 0.03
GRADIENT_FREE = ("square", "rays")


def masking_suspected(robust_acc: dict[str, float]) -> bool:
    """True when a gradient-free attack finds markedly lower accuracy than every gradient attack."""
    free = [acc for name, acc in robust_acc.items() if name.startswith(GRADIENT_FREE)]
    gradient = [acc for name, acc in robust_acc.items() if not name.startswith(GRADIENT_FREE)]
    return bool(free and gradient) and min(free) < min(gradient) - MASKING_MARGIN




@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation is; two runs of one spec give the same per-example results."""
    checkpoint: str
    checkpoint_sha256: str
    dataset: str
    data_dir: str | None
    attacks: tuple[str, ...]
    eps: float
    alpha: float | None
    eval_n: int | None
    batch_size: int
    seed: int

    def identity(self) -> dict:
        """What must match for stored batches to be reused (the file's path may move)."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "data_dir")} | {
            "attacks": list(self.attacks)}


def batch_seed(seed: int, batch: int) -> int:
    return seed * 1_000_003 + batch


class BatchEvaluator:
    """The checkpoint's model, the test split and the attacks, loaded once (in this process or
    in a Ray actor); ``results(batches)`` evaluates the given batches of the split."""

    def __init__(self, spec: EvalSpec, device: str | None = None):
        import torch

        self.spec = spec
        with tempfile.TemporaryDirectory() as tmp:  # a URI: each actor copies the file for itself
            local = local_copy(spec.checkpoint, tmp)
            cfg = config_from_dict(Checkpoint(local).config)
            self.model = load_model(local)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.attacks = {name: build_attack(name, spec.eps, spec.alpha) for name in spec.attacks}
        self.test = build_splits(spec.dataset, spec.data_dir, spec.batch_size, 0, None, spec.eval_n, None,
                                 spec.seed, cfg.data.loader_workers).test

    def results(self, batches: list[int]):
        """Per batch of ``batches`` (ascending): its index and, per column, one '1' or '0' per
        example (classified correctly or not), in the split's order."""
        import torch

        from .core.engine import correct_per_example, to_device

        wanted = set(batches)
        self.test.set_epoch(0, start_batch=min(wanted))
        for b, (x, y) in enumerate(self.test, min(wanted)):
            if b > max(wanted):
                break
            if b not in wanted:
                continue
            torch.manual_seed(batch_seed(self.spec.seed, b))
            x, y = to_device(x, y, self.device)
            correct = correct_per_example(self.model, x, y, self.attacks)
            yield {"batch": b, "correct": {k: "".join("1" if c else "0" for c in v.tolist()) for k, v in correct.items()}}

    def run(self, batches: list[int]) -> list[dict]:
        return list(self.results(batches))


class Parts:
    """The per-batch results of one evaluation in a directory: ``evaluation.json`` (what it is)
    and one ``batch-NNNNNN.json`` per batch done, each written whole (atomically)."""

    def __init__(self, directory: Path, spec: EvalSpec, num_batches: int):
        self.dir, self.num_batches = directory, num_batches
        manifest = directory / "evaluation.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())
            differ = sorted(k for k in spec.identity() if found.get(k) != spec.identity()[k])
            if differ:
                raise ConfigError(f"--parts-dir {directory} holds the batches of another evaluation (its "
                                  f"{', '.join(differ)} differ): delete it or give another --parts-dir")
        else:
            write_text_atomic(manifest, json.dumps(spec.identity(), indent=2) + "\n")

    def path(self, batch: int) -> Path:
        return self.dir / f"batch-{batch:06d}.json"

    def pending(self) -> list[int]:
        return [b for b in range(self.num_batches) if not self.path(b).exists()]

    def save(self, result: dict) -> None:
        write_text_atomic(self.path(result["batch"]), json.dumps(result) + "\n")

    def merged(self) -> dict[str, str]:
        """Per column, every example's '1'/'0' in the split's order."""
        columns: dict[str, list[str]] = {}
        for b in range(self.num_batches):
            for name, bits in json.loads(self.path(b).read_text())["correct"].items():
                columns.setdefault(name, []).append(bits)
        return {name: "".join(bits) for name, bits in columns.items()}


def run_batches(spec: EvalSpec, parts: Parts, workers: int, gpu: bool) -> int:
    """Evaluate the batches ``parts`` lacks, in this process (``workers`` 0) or on Ray actors;
    each batch is saved as it arrives. Returns how many batches were computed."""
    pending = parts.pending()
    done, start = 0, time.perf_counter()

    def saved(result: dict) -> None:
        nonlocal done
        parts.save(result)
        done += 1
        elapsed = time.perf_counter() - start
        print(f"evaluate: batch {result['batch'] + 1}/{parts.num_batches} done; {done}/{len(pending)} this run, "
              f"{elapsed:.0f} s, ETA {elapsed / done * (len(pending) - done):.0f} s", file=sys.stderr, flush=True)

    if not pending:
        return 0
    if workers == 0:
        for result in BatchEvaluator(spec).results(pending):
            saved(result)
        return done
    import ray
    from ray.util import ActorPool

    from .distributed import even_share_of_cpus, init_ray

    init_ray()
    if gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("--gpu: the Ray cluster has no GPU")
    # A killed actor is restarted and its batch retried; the batches already saved stay saved.
    actor = ray.remote(BatchEvaluator).options(num_cpus=even_share_of_cpus(workers), num_gpus=1 if gpu else 0,
                                               max_restarts=-1, max_task_retries=-1)
    pool = ActorPool([actor.remote(spec, "cuda" if gpu else "cpu") for _ in range(min(workers, len(pending)))])
    for results in pool.map_unordered(lambda a, b: a.run.remote([b]), pending):
        for result in results:
            saved(result)
    return done


def attack_versions(names) -> dict[str, str]:
    """Which code each attack is: the library and its version for the borrowed ones (AutoAttack,
    torchattacks'), this project's version (and the commit in the JSON's provenance) otherwise."""
    from importlib.metadata import version

    def library(name: str) -> str:
        if name == "autoattack":
            return f"pyautoattack {version('pyautoattack')} (AutoAttack, version='standard')"
        if name.startswith(("tapgd", "square")):
            return f"torchattacks {version('torchattacks')}"
        return f"atcd_ray {version('atcd_ray')}"

    return {name: library(name) for name in names}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m atcd_ray.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint file, or its URI (s3://..., see atcd_ray.storage)")
    p.add_argument("--dataset", help="default: the checkpoint's")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--attacks", default="pgd20,mifgsm20,cw20", help="comma-separated attack names")
    p.add_argument("--eps", type=float, help="default: the checkpoint's training eps")
    p.add_argument("--alpha", type=float, help="attack step size (default eps/4)")
    p.add_argument("--eval-n", type=int, help="first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray actors to spread the batches over (0: this process, no Ray)")
    p.add_argument("--gpu", action="store_true", help="with --workers: one GPU per actor")
    p.add_argument("--parts-dir", help="where the per-batch results go (default: beside --json, else "
                                       "beside the checkpoint, named by the evaluation's settings)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate_checkpoint(args, local_copy(args.checkpoint, tmp))


def evaluate_checkpoint(args: argparse.Namespace, local: Path) -> int:
    """``local``: the checkpoint's file here (``args.checkpoint`` may be a URI)."""
    ckpt = Checkpoint(local)
    cfg = config_from_dict(ckpt.config)
    dataset = args.dataset or cfg.dataset
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    eps = cfg.eps if args.eps is None else args.eps
    if not 0 <= eps < math.inf or (args.eval_n is not None and args.eval_n <= 0) or args.batch_size <= 0:
        raise ConfigError("--eps must be a finite number >= 0, --eval-n and --batch-size > 0")
    if args.workers < 0 or (args.gpu and not args.workers):
        raise ConfigError("--workers must be >= 0, and --gpu needs --workers >= 1")
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

    from .trainer import provenance

    data_dir = args.data_dir or cfg.data.dir
    where = args.checkpoint if is_uri(args.checkpoint) else str(Path(args.checkpoint).resolve())  # for actors
    spec = EvalSpec(checkpoint=where, checkpoint_sha256=file_sha256(local),
                    dataset=dataset, data_dir=data_dir, attacks=tuple(attacks), eps=eps, alpha=args.alpha,
                    eval_n=args.eval_n, batch_size=args.batch_size, seed=args.seed)
    n = build_splits(dataset, data_dir, args.batch_size, 0, None, args.eval_n, None, args.seed,
                     cfg.data.loader_workers).test.num_examples
    key = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()[:12]
    beside = Path.cwd() if is_uri(args.checkpoint) else Path(args.checkpoint).parent
    parts_dir = Path(args.parts_dir or (f"{args.json}.parts" if args.json else beside / f"evaluate-{key}.parts"))
    parts = Parts(parts_dir, spec, num_batches=-(-n // args.batch_size))
    start = time.perf_counter()
    computed = run_batches(spec, parts, args.workers, args.gpu)
    correct = parts.merged()
    accuracy = {name: bits.count("1") / n for name, bits in correct.items()}
    result = {"checkpoint": str(args.checkpoint), "dataset": dataset, "eps": eps, "method": cfg.train.method,
              "n": n, "clean_acc": accuracy["clean"], "robust_acc": {name: accuracy[name] for name in attacks},
              "seconds": time.perf_counter() - start, "batches_computed": computed, "workers": args.workers,
              "batch_size": args.batch_size, "seed": args.seed, "parts_dir": str(parts_dir),
              "model": cfg.model, "threat_model": "Linf", "attack_versions": attack_versions(attacks),
              "provenance": provenance()}
    if len(attacks) > 1:  # robust to every attack asked: exact, from the per-example results
        every = [all(bits[i] == "1" for name, bits in correct.items() if name != "clean") for i in range(n)]
        result["every_attack_acc"] = sum(every) / n
    result["correct"] = correct
    result["gradient_masking_suspected"] = masking_suspected(result["robust_acc"])
    every = {"every attack": result["every_attack_acc"]} if "every_attack_acc" in result else {}
    print(markdown_table([{"model": Path(args.checkpoint).parent.name, "clean": accuracy["clean"],
                           **result["robust_acc"], **every}], ["model", "clean", *attacks, *every]))
    if result["gradient_masking_suspected"]:
        print(f"WARNING: a gradient-free attack beats the gradient attacks by more than {MASKING_MARGIN:.0%}: "
              "the model likely masks gradients, and its gradient-based robust accuracy overstates robustness")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
