"""Images per second of the data loaders alone, side by side (interleaved rounds) in one process.

    python benchmarks/loader_throughput.py --ffcv-dir DIR [--tree TREE --imagenet-ffcv-dir DIR2] [--rounds 3]

Fashion-MNIST: the in-memory loader against FFCV (DIR/train.beton, val.beton from
``python -m atcd_ray.write_ffcv``). ImageNet layout: the torchvision ImageFolder loader
against FFCV on the same JPEG tree. Medians over rounds of one pass each.
"""
import argparse
import statistics
import time

from atcd_ray.data import build_splits


def images_per_second(batches) -> float:
    start, n = time.perf_counter(), 0
    for _, y in batches:
        n += len(y)
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ffcv-dir", required=True)
    p.add_argument("--tree")
    p.add_argument("--imagenet-ffcv-dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    loaders = {
        "fashion-mnist in-memory": build_splits("fashion-mnist", data_dir=None, batch_size=128, val_size=5000,
                                                subset=None, eval_n=None, val_n=None, seed=0).train,
        "fashion-mnist ffcv": build_splits("fashion-mnist", data_dir=None, batch_size=128, val_size=5000, subset=None,
                                           eval_n=None, val_n=None, seed=0,
                                           loader_workers=args.workers, ffcv_dir=args.ffcv_dir).train,
    }
    if args.tree:
        loaders["imagenet-tree torchvision"] = build_splits("imagenet", data_dir=args.tree, batch_size=32, val_size=10,
                                                            subset=None, eval_n=None, val_n=None, seed=0,
                                                             loader_workers=args.workers).train
        loaders["imagenet-tree ffcv"] = build_splits("imagenet", data_dir=args.tree, batch_size=32, val_size=10,
                                                     subset=None, eval_n=None, val_n=None, seed=0,
                                                      loader_workers=args.workers, ffcv_dir=args.imagenet_ffcv_dir).train
    for batches in loaders.values():  # warm-up (FFCV compiles its pipeline on the first pass)
        images_per_second(batches)
    rates = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, batches in loaders.items():
            rates[name].append(images_per_second(batches))
    print("| loader | images/s (median) |")
    print("|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.0f} |")


if __name__ == "__main__":
    main()
