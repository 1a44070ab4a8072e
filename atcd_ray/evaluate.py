"""``python -m atcd_ray.evaluate CHECKPOINT``: clean and robust accuracy of a trained model.

    python -m atcd_ray.evaluate runs/atcd/last.safetensors --attacks pgd20,mifgsm20,cw20,tapgd20

Attacks: fgsm, pgdN, pgdNxR (R restarts), mifgsmN, cwN (PGD on the CW margin), tapgdN
(torchattacks' PGD, independent of this project), hmc[N] (the paper's HMC attack, N proposals,
default 20), autoattack (standard, the authors' code), square[Q] and rays[Q] (gradient-free, Q
queries, default 5000 and 10000). Step eps/4. If a gradient-free attack beats every gradient attack
by more than 3 points, the output says that the model likely masks gradients (give at least 1000
queries: tests/test_robustness.py shows square1000 flag an input-quantised network on 100 images).

Sharded and resumable: the test examples are cut into batches of --batch-size; every attack on batch
b starts from torch's generator seeded from (--seed, b) alone (AutoAttack and torchattacks' Square
fix their own seed, 0), and the batch's per-example results (which examples each attack broke) are written
to --parts-dir as soon as it is done. A rerun of the same command computes only the batches not
yet there, and --workers N spreads the batches over N Ray actors (each loads the checkpoint and
the data once). The result is the same on any number of workers, and after any number of
interruptions, for the same --batch-size and device (--gpu: CUDA, in this process or one GPU per
actor; default the CPU). The merge is per example, so "every attack" (correct clean and under
all the attacks asked) is exact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from . import __version__, model_of
from .cli import ArgumentParser, markdown_table, run_main
from .config import Config, ConfigError, config_from_dict
from .core.attacks import autoattack_flags, build_attack
from .core.checkpoint import CheckpointError, write_json_atomic
from .data import DATASETS, DataError, build_test_split
from .storage import is_uri, local_copy, read_checkpoint


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
    device: str  # "cpu" or "cuda": the same attack can round differently on the two

    def identity(self) -> dict:
        """What must match for stored batches to be reused (the file's path may move)."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "data_dir")} | {
            "attacks": list(self.attacks)}


def batch_seed(seed: int, batch: int) -> int:
    """Batch ``batch``'s seed: distinct for every (seed, batch) with fewer than a million batches."""
    return seed * 1_000_003 + batch


def eval_split(spec: EvalSpec, loader_workers: int):
    return build_test_split(spec.dataset, data_dir=spec.data_dir, batch_size=spec.batch_size, eval_n=spec.eval_n,
                            seed=spec.seed, loader_workers=loader_workers)


class BatchEvaluator:
    """The checkpoint's model, the test split and the attacks, loaded once (in this process or
    in a Ray actor); ``results(batches)`` evaluates the given batches of the split. ``test``: the
    split, where the caller has it already (in this process)."""

    def __init__(self, spec: EvalSpec, test=None):
        self.spec, self.test, self.model = spec, test, None  # loaded by the first batch: its errors are a task's

    def _load(self) -> None:
        import torch

        spec = self.spec
        with tempfile.TemporaryDirectory() as tmp:  # a URI: each actor copies the file for itself
            local = local_copy(spec.checkpoint, tmp)
            if file_sha256(local) != spec.checkpoint_sha256:  # replaced since the evaluation began
                raise CheckpointError(f"{spec.checkpoint} changed during the evaluation (sha256 differs)")
            checkpoint = read_checkpoint(local, spec.checkpoint)
        self.device = torch.device(spec.device)
        self.model = model_of(checkpoint, spec.checkpoint).to(self.device)
        self.attacks = {name: build_attack(name, spec.eps, spec.alpha) for name in spec.attacks}
        if self.test is None:
            self.test = eval_split(spec, config_from_dict(checkpoint.config).data.loader_workers)

    def results(self, batches: list[int]):
        """Per batch of ``batches`` (ascending): its index and, per column, one '1' or '0' per
        example (classified correctly or not), in the split's order."""
        from .core.engine import correct_per_example, to_device

        if self.model is None:
            self._load()
        wanted, first, last = set(batches), min(batches), max(batches)
        self.test.set_epoch(0, start_batch=first)
        for b, (x, y) in enumerate(self.test, first):
            if b in wanted:
                x, y = to_device(x, y, self.device)
                with autoattack_flags() as flags:
                    correct = correct_per_example(self.model, x, y, self.attacks,
                                                  seed=batch_seed(self.spec.seed, b))
                yield {"batch": b, "correct": {k: "".join("1" if c else "0" for c in v.tolist())
                                               for k, v in correct.items()},
                       **({"autoattack_flags": flags} if "autoattack" in self.attacks else {})}
            if b == last:  # not one batch more: a folder loader would start on it
                break

    def run(self, batches: list[int]) -> list[dict]:
        return list(self.results(batches))


class Parts:
    """The per-batch results of one evaluation in a directory: ``evaluation.json`` (what it is,
    and which code wrote it) and one ``batch-NNNNNN.json`` per batch done, each written whole."""

    def __init__(self, directory: Path, spec: EvalSpec, num_examples: int, code: dict):
        self.dir, self.spec, self.n = directory, spec, num_examples
        self.num_batches = -(-num_examples // spec.batch_size)
        manifest = directory / "evaluation.json"
        identity = spec.identity()
        if manifest.exists():
            found = self._read(manifest)
            differ = sorted(k for k in identity if found.get(k) != identity[k])
            if differ:
                raise ConfigError(f"--parts-dir {directory} holds the batches of another evaluation (its "
                                  f"{', '.join(differ)} differ): delete it or give another --parts-dir")
            if found.get("code") != code:
                print(f"warning: {directory}'s batches so far were computed by other code ({found.get('code')}); "
                      f"this run is {code}", file=sys.stderr)
        else:
            write_json_atomic(manifest, {**identity, "code": code})

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path} is not whole JSON: delete it (its batch is then computed again)") from None

    def path(self, batch: int) -> Path:
        return self.dir / f"batch-{batch:06d}.json"

    def pending(self) -> list[int]:
        return [b for b in range(self.num_batches) if not self.path(b).exists()]

    def save(self, result: dict) -> None:
        write_json_atomic(self.path(result["batch"]), result, indent=None)

    def merged(self) -> dict[str, str]:
        """Per column, every example's '1'/'0' in the split's order; each batch checked whole."""
        columns = ["clean", *self.spec.attacks]
        merged: dict[str, list[str]] = {name: [] for name in columns}
        for b in range(self.num_batches):
            correct = self._read(self.path(b)).get("correct", {})
            size = min(self.spec.batch_size, self.n - b * self.spec.batch_size)
            if sorted(correct) != sorted(columns) or any(len(bits) != size for bits in correct.values()):
                raise ConfigError(f"{self.path(b)} does not hold {size} results for each of {', '.join(columns)}: "
                                  "delete it (its batch is then computed again)")
            for name in columns:
                merged[name].append(correct[name])
        return {name: "".join(bits) for name, bits in merged.items()}

    def autoattack_flags(self) -> dict[str, list[str]] | None:
        """AutoAttack's own warnings (``core.attacks.autoattack_flags``) by batch, for the batches that
        have any; None when a batch was evaluated by code that did not record them."""
        parts = [self._read(self.path(b)) for b in range(self.num_batches)]
        if any("autoattack_flags" not in part for part in parts):
            return None
        return {str(b): part["autoattack_flags"] for b, part in enumerate(parts) if part["autoattack_flags"]}


def run_batches(spec: EvalSpec, parts: Parts, workers: int, test=None) -> int:
    """Evaluate the batches ``parts`` lacks, in this process (``workers`` 0, on ``test`` where
    given) or on Ray actors (each loads the split); each batch is saved as it arrives. Returns
    how many batches were computed."""
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
        for result in BatchEvaluator(spec, test).results(pending):
            saved(result)
        return done
    import ray
    from ray.util import ActorPool

    from .distributed import init_ray

    init_ray()
    resources = ray.cluster_resources()
    gpu = spec.device == "cuda"
    # No more actors than the cluster can place now: an actor Ray cannot place would hold its
    # batch forever (ActorPool hands every actor a batch at once).
    actors = min(workers, len(pending), max(1, int(resources.get("CPU", 1))),
                 *([int(resources.get("GPU", 0))] if gpu else []))
    if actors < 1:
        raise ConfigError("--gpu: the Ray cluster has no GPU")
    if actors < min(workers, len(pending)):
        print(f"evaluate: {actors} actors (what the cluster holds now), not {workers}", file=sys.stderr)
    # A killed actor is restarted and its batch retried (a few times: a batch that kills its
    # actor every time must end the run); the batches already saved stay saved. The AWS
    # environment goes with the actors, for a checkpoint on object storage read on other nodes.
    actor = ray.remote(BatchEvaluator).options(
        num_cpus=max(1, int(resources.get("CPU", 1)) // actors), num_gpus=1 if gpu else 0,
        max_restarts=3, max_task_retries=3,
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    pool = ActorPool([actor.remote(spec) for _ in range(actors)])
    try:
        for results in pool.map_unordered(lambda a, b: a.run.remote([b]), pending):
            for result in results:
                saved(result)
    except ray.exceptions.RayTaskError as err:  # an actor's bad input: its one line, not Ray's traceback
        if isinstance(err.cause, (ConfigError, DataError, CheckpointError, FileNotFoundError)):
            raise err.cause from None
        raise
    return done


def attack_versions(names) -> dict[str, str]:
    """Which code each attack is: the library and its version for the borrowed ones (AutoAttack,
    torchattacks'), this project's version (and the commit in the JSON's provenance) otherwise."""
    from importlib.metadata import version

    def library(name: str) -> str:  # atcd_ray's own from __version__: a source tree need not be installed
        if name == "autoattack":
            return f"pyautoattack {version('pyautoattack')} (AutoAttack, version='standard')"
        if name.startswith(("tapgd", "square")):
            return f"torchattacks {version('torchattacks')}"
        return f"atcd_ray {__version__}"

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
    p.add_argument("--gpu", action="store_true", help="evaluate on CUDA: this process's GPU, or one GPU per actor "
                                                   "(default: the CPU, in both)")
    p.add_argument("--parts-dir", help="where the per-batch results go (default: beside --json, else "
                                       "beside the checkpoint, named by the evaluation's settings)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = evaluate_checkpoint(
        args.checkpoint, attacks=[name for name in args.attacks.split(",") if name], dataset=args.dataset,
        data_dir=args.data_dir, eps=args.eps, alpha=args.alpha, eval_n=args.eval_n, batch_size=args.batch_size,
        seed=args.seed, workers=args.workers, gpu=args.gpu,
        parts_dir=args.parts_dir or (f"{args.json}.parts" if args.json else None))
    print_result(result)
    if args.json:
        write_json_atomic(Path(args.json), result)
    return 0


def evaluate_checkpoint(checkpoint: str | Path, *, attacks: Sequence[str] = ("pgd20", "mifgsm20", "cw20"),
                        dataset: str | None = None, data_dir: str | None = None, eps: float | None = None,
                        alpha: float | None = None, eval_n: int | None = None, batch_size: int = 256, seed: int = 0,
                        workers: int = 0, gpu: bool = False, parts_dir: str | Path | None = None) -> dict:
    """A checkpoint (a file, or its URI) on the first ``eval_n`` test images of ``dataset`` (default:
    the checkpoint's; its data_dir and eps too) under each attack; ``workers`` Ray actors share the
    batches (0: this process). Per-batch results go to ``parts_dir`` (default: beside the
    checkpoint, named by the evaluation's settings), so an interrupted evaluation resumes. Returns
    the result (``python -m atcd_ray.evaluate --json`` writes it): accuracies, per-example
    correctness, AutoAttack's own flags, provenance."""
    with tempfile.TemporaryDirectory() as tmp:
        local = local_copy(str(checkpoint), tmp)
        ckpt = read_checkpoint(local, str(checkpoint))
        cfg = config_from_dict(ckpt.config)
        if ckpt.ema_state():  # a training checkpoint of a train.ema run: its model.* are the raw weights
            print(f"note: {checkpoint} is a training checkpoint; evaluating its raw weights, not the weight "
                  "average (train.ema), whose weights are in the run's ema.safetensors (and, under "
                  "select_best = robust_val, best.safetensors)", file=sys.stderr)
        dataset = dataset or cfg.dataset
        eps = cfg.eps if eps is None else eps
        check_request(cfg, checkpoint, dataset=dataset, eps=eps, eval_n=eval_n, batch_size=batch_size,
                      workers=workers)
        try:
            built = {name: build_attack(name, eps, alpha) for name in attacks}
        except ValueError as err:
            raise ConfigError(f"--attacks: {err}") from None
        from .data.sources import check_available

        data_dir = data_dir or cfg.data.dir
        check_available(dataset, data_dir, test_only=True)

        import torch

        if gpu and not workers and not torch.cuda.is_available():
            raise ConfigError("--gpu: this machine has no CUDA device")
        # Paths as every actor sees them, whatever its working directory.
        absolute = lambda path: path if path is None or is_uri(path) else str(Path(path).resolve())  # noqa: E731
        spec = EvalSpec(checkpoint=absolute(str(checkpoint)), checkpoint_sha256=file_sha256(local),
                        dataset=dataset, data_dir=absolute(data_dir), attacks=tuple(built), eps=eps, alpha=alpha,
                        eval_n=eval_n, batch_size=batch_size, seed=seed, device="cuda" if gpu else "cpu")
        return run_evaluation(spec, cfg, parts_dir=parts_dir, workers=workers)


def run_evaluation(spec: EvalSpec, cfg: Config, *, parts_dir: str | Path | None, workers: int) -> dict:
    """``evaluate_checkpoint``'s work, once its request is checked: the batches not yet in the
    parts directory, then the result from every batch's per-example correctness."""
    from .provenance import provenance

    test = eval_split(spec, cfg.data.loader_workers)
    key = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()[:12]
    beside = Path.cwd() if is_uri(spec.checkpoint) else Path(spec.checkpoint).parent
    parts_dir = Path(parts_dir or beside / f"evaluate-{key}.parts")
    versions, produced_by = attack_versions(spec.attacks), provenance()  # provenance runs git: once
    n = test.num_examples
    parts = Parts(parts_dir, spec, num_examples=n, code={"commit": produced_by["commit"], "attacks": versions})
    start = time.perf_counter()
    computed = run_batches(spec, parts, workers, test)
    correct = parts.merged()
    accuracy = {name: bits.count("1") / n for name, bits in correct.items()}
    result = {"checkpoint": spec.checkpoint, "dataset": spec.dataset, "eps": spec.eps, "method": cfg.train.method,
              "n": n, "clean_acc": accuracy["clean"], "robust_acc": {name: accuracy[name] for name in spec.attacks},
              "seconds": time.perf_counter() - start, "batches_computed": computed, "workers": workers,
              "batch_size": spec.batch_size, "seed": spec.seed, "parts_dir": str(parts_dir),
              "device": spec.device, "model": cfg.model, "threat_model": "Linf", "attack_versions": versions,
              "provenance": produced_by}
    if len(spec.attacks) > 1:  # correct clean and under every attack asked: exact, from the per-example results
        result["every_attack_acc"] = sum(all(bits[i] == "1" for bits in correct.values()) for i in range(n)) / n
    result["correct"] = correct
    result["gradient_masking_suspected"] = masking_suspected(result["robust_acc"])
    if "autoattack" in spec.attacks:
        result["autoattack_flags"] = parts.autoattack_flags()
    return result


def check_request(cfg: Config, checkpoint: str | Path, *, dataset: str, eps: float, eval_n: int | None,
                  batch_size: int, workers: int) -> None:
    """What is asked of a checkpoint trained under ``cfg``, checked before any work: one line each."""
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    if not 0 <= eps < math.inf or (eval_n is not None and eval_n <= 0) or batch_size <= 0:
        raise ConfigError("--eps must be a finite number >= 0, --eval-n and --batch-size > 0")
    if workers < 0:
        raise ConfigError("--workers must be >= 0")
    trained, asked = DATASETS[cfg.dataset], DATASETS[dataset]
    shape = lambda spec: (spec.in_channels, spec.image_size, spec.num_classes)  # noqa: E731
    if shape(trained) != shape(asked):
        raise ConfigError(f"--dataset {dataset}: {checkpoint} is a {cfg.model} for {cfg.dataset} "
                          f"({trained.in_channels}x{trained.image_size}x{trained.image_size} images, "
                          f"{trained.num_classes} classes), not for {dataset} ({asked.in_channels}x"
                          f"{asked.image_size}x{asked.image_size}, {asked.num_classes} classes)")


def print_result(result: dict) -> None:
    """The result's table, and the warnings it carries (gradient masking, AutoAttack's checks)."""
    every_column = {"every attack": result["every_attack_acc"]} if "every_attack_acc" in result else {}
    attacks = list(result["robust_acc"])
    print(markdown_table([{"model": Path(result["checkpoint"]).parent.name, "clean": result["clean_acc"],
                           **result["robust_acc"], **every_column}], ["model", "clean", *attacks, *every_column]))
    if result["gradient_masking_suspected"]:
        print(f"WARNING: a gradient-free attack beats the gradient attacks by more than {MASKING_MARGIN:.0%}: "
              "the model likely masks gradients, and its gradient-based robust accuracy overstates robustness")
    for batch, flags in (result.get("autoattack_flags") or {}).items():
        print(f"WARNING: AutoAttack's own checks, batch {batch} (examples from {int(batch) * result['batch_size']}): "
              + " | ".join(flags))


if __name__ == "__main__":
    sys.exit(run_main(main))
