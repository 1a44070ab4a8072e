"""Training throughput on a GPU: every method against a bare loop doing its passes, three ways.

    python benchmarks/gpu_throughput.py --out runs/gpu-throughput            # on a CUDA machine
    python benchmarks/gpu_throughput.py --smoke                              # tiny shapes, CPU (CI)

For ResNet-50 at 224 (batch 256) and PreActResNet18 at 32 (batch 512), images/s of natural
training, Fast-FGSM, Free-4, ATCD-2-2, ATCD-4-2 and PGD-10 on generated batches, each beside a
bare loop doing the same forward and backward passes (benchmarks/bare.py), in three variants:
``eager`` (float32, contiguous), ``cl+bf16`` (channels-last, bfloat16 autocast) and
``cl+bf16+compile`` (the same, model compiled). Timed with CUDA synchronisation around rounds of
``--steps`` minibatches, median of ``--rounds`` interleaved rounds. Then FFCV's loader on a
generated JPEG tree with every CPU core, and one Ray Train worker against the same training loop
in this process (``python -m atcd_ray.train digits``, images/s of the last epoch).

Each result is printed as it comes and appended to OUT/gpu_throughput.jsonl; ``--budget-s`` skips
what would not finish in time, so a run cut short still leaves its table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bare import BareLoop  # noqa: E402

from atcd_ray.core.engine import autocast  # noqa: E402
from atcd_ray.core.methods import METHODS  # noqa: E402
from atcd_ray.core.models import build_model  # noqa: E402

# label: (method, options, bare loop as (updates, input-gradient passes per update))
RUNS = {
    "natural": ("natural", {}, (1, 0)),
    "fast": ("fast", {}, (1, 1)),
    "free-4": ("free", {"replays": 4}, (4, 0)),
    "atcd-2-2": ("atcd", {"T": 2, "K": 2}, (2, 2)),
    "atcd-4-2": ("atcd", {"T": 4, "K": 2}, (4, 2)),
    "pgd-10": ("pgd", {"steps": 10}, (1, 10)),
}
# model: (image size, batch, classes, eps)
SHAPES = {"resnet50": (224, 256, 1000, 4 / 255), "preactresnet18": (32, 512, 10, 8 / 255)}
SMOKE_SHAPES = {"resnet50": (32, 2, 10, 4 / 255), "preactresnet18": (32, 2, 10, 8 / 255)}
SMOKE_METHODS = ["natural", "atcd-2-2"]  # beyond eager: bfloat16 convolutions are slow on most CPUs
VARIANTS = {"eager": (False, False, False), "cl+bf16": (True, True, False), "cl+bf16+compile": (True, True, True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one step in each of 3 rounds (the median), on the CPU, no budget: every method on PreActResNet18 eager, "
                   "natural (and ATCD-2-2 compiled) in its other variants, natural and ATCD-2-2 on ResNet-50 eager")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--methods", default=",".join(RUNS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="minibatches per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' traces only)")
    p.add_argument("--budget-s", type=float, default=420, help="skip what starts after this many seconds")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--out", default=None, help="directory for gpu_throughput.jsonl")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.compile_backend, args.budget_s = 1, 3, "eager", float("inf")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []

    def emit(row):
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        with (out / "gpu_throughput.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    emit({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
          "cpus": os.cpu_count(), "smoke": args.smoke})
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    for model_name in args.models.split(","):
        for variant in args.variants.split(","):
            if time.perf_counter() - start > args.budget_s:
                emit({"model": model_name, "variant": variant, "skipped": "over budget"})
                continue
            methods = args.methods.split(",")
            if args.smoke and (variant, model_name) != ("eager", "preactresnet18"):
                methods = [m for m in methods if m in SMOKE_METHODS[:1 if variant == "cl+bf16" else 2]]
            if args.smoke and model_name == "resnet50" and variant != "eager":
                continue
            for row in steps_per_second(model_name, shapes[model_name], variant, methods, device=device,
                                        steps=args.steps, rounds=args.rounds, compile_backend=args.compile_backend):
                emit(row)
    if not args.skip_loader and time.perf_counter() - start < args.budget_s:
        emit(ffcv_loader(device, smoke=args.smoke))
    if not args.skip_ray and time.perf_counter() - start < args.budget_s:
        emit(ray_against_in_process(device, smoke=args.smoke))
    print_tables(results)
    return 0


def steps_per_second(model_name, shape, variant, labels, device, steps, rounds, compile_backend):
    """Rows of {model, variant, method, images_per_second, bare_images_per_second, ratio, passes}."""
    size, batch, classes, eps = shape
    channels_last, amp, compiled = VARIANTS[variant]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(model_name, classes, 3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = model.to(device, memory_format=memory_format)
    if compiled:
        model.compile(backend=compile_backend)  # one compiled model shared by every method of this variant
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, classes, (batch,), device=device)
    runners = {}
    for label in labels:
        method, options, (updates, attack_passes) = RUNS[label]
        opts = METHODS[method].Options(**options)
        runners[label] = METHODS[method](model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), eps, opts)
        runners["bare-" + label] = BareLoop(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), eps,
                                            updates, attack_passes)
    seconds = {name: [] for name in runners}
    accept = {}
    for name, runner in runners.items():  # warm-up (and compilation)
        with autocast(amp, device):
            runner.step(x, y)
    for _ in range(rounds):
        for name, runner in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                with autocast(amp, device):
                    stats = runner.step(x, y)
            _sync(device)
            seconds[name].append((time.perf_counter() - t0) / steps)
            if "mh_accept_rate" in stats:
                accept[name] = float(stats["mh_accept_rate"])
    for label in labels:
        method_s, bare_s = statistics.median(seconds[label]), statistics.median(seconds["bare-" + label])
        yield {"model": model_name, "variant": variant, "method": label, "batch": batch, "size": size,
               "images_per_second": batch / method_s, "bare_images_per_second": batch / bare_s,
               "ratio_to_bare": method_s / bare_s, "passes": runners["bare-" + label].passes,
               **({"mh_accept_rate": accept[label]} if label in accept else {})}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ffcv_loader(device, smoke: bool) -> dict:
    """Images/s of FFCV's ImageNet training pipeline (random-resized-crop decode to 224, flip,
    onto the device) on a generated JPEG ImageFolder, with every CPU core."""
    try:
        from atcd_ray.data import DATASETS
        from atcd_ray.data.ffcv_batches import FFCVBatches
        from atcd_ray.write_ffcv import main as write_main
    except ImportError as err:
        return {"loader": "ffcv", "skipped": f"FFCV not importable: {err}"}
    from tests.test_data import make_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        tree, beton = Path(tmp) / "tree", Path(tmp) / "train.beton"
        per_class = 8 if smoke else 256
        make_image_folder(tree, classes=8, per_class=per_class, size=64 if smoke else 400)
        write_main(["imagenet", "--data-dir", str(tree), "--split", "train", "--out", str(beton)])
        batches = FFCVBatches(str(beton), "imagenet", DATASETS["imagenet"], 16 if smoke else 256, train=True, seed=0,
                              workers=os.cpu_count(), device=device)
        rates = []
        for epoch in range(1 if smoke else 3):
            batches.set_epoch(epoch)
            t0, images = time.perf_counter(), 0
            for x, _ in batches:
                images += len(x)
            _sync(device)
            rates.append(images / (time.perf_counter() - t0))
    return {"loader": "ffcv imagenet train pipeline", "images": images, "workers": os.cpu_count(),
            "images_per_second": statistics.median(rates), "note": "JPEGs of noise, 400x408; first pass included"}


def ray_against_in_process(device, smoke: bool) -> dict:
    """The same run (digits, ATCD; PreActResNet18, SmallCNN for --smoke) with --workers 0 and
    through one Ray Train worker; images/s of the last epoch of each."""
    try:
        import ray  # noqa: F401
    except ImportError as err:
        return {"ray": "skipped", "why": f"Ray not importable: {err}"}
    rates = {}
    model, size = ("smallcnn", ["--subset", "512"]) if smoke else ("preactresnet18", [])
    with tempfile.TemporaryDirectory() as tmp:
        for workers in ("0", "1"):
            cmd = [sys.executable, "-m", "atcd_ray.train", "digits", "--method", "atcd", "--epochs", "1" if smoke else "3",
                   "--eval-n", "64", "--workers", workers, "--out", str(Path(tmp) / f"w{workers}"), *size,
                   "--set", f"model={model}", "--set", "train.val_n=64", "--set", "eval.attacks=[pgd10]",
                   "--set", "train.progress_seconds=0.5"]
            if device.type == "cuda" and workers == "1":
                cmd.append("--gpu")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode:
                return {"ray": "failed", "workers": workers, "stderr": proc.stderr[-2000:]}
            last = [json.loads(line) for line in (Path(tmp) / f"w{workers}" / "metrics.jsonl").read_text().splitlines()][-1]
            rates[workers] = last["train_images_per_second"]
            progress = [line for line in (proc.stdout + proc.stderr).splitlines() if "images/s  ETA" in line]
    return {"ray": f"digits {model} atcd", "in_process_images_per_second": rates["0"],
            "ray_1_worker_images_per_second": rates["1"], "ratio": rates["1"] / rates["0"],
            "ray_progress_lines": len(progress), "ray_progress_example": progress[0] if progress else None}


def print_tables(results):
    rows = [r for r in results if "method" in r]
    if rows:
        print("\n| model | variant | method | passes | images/s | bare loop images/s | method / bare (time) | M-H acceptance |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['variant']} | {r['method']} | {r['passes']} | {r['images_per_second']:.0f} | "
                  f"{r['bare_images_per_second']:.0f} | {r['ratio_to_bare']:.3f} | {r.get('mh_accept_rate', '')} |")
    for r in results:
        if "loader" in r or "ray" in r:
            print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
