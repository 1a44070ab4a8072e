"""``python -m atcd_ray.write_ffcv DATASET --split train|val --out FILE.beton``

Writes a dataset split as an FFCV file. 28x28 grayscale datasets are stored raw as (28, 28, 1)
arrays, CIFAR-10 as raw RGB, ImageNet as JPEG with ffcv-imagenet's choices as options
(``--max-resolution 256 --jpeg-quality 90 --compress-probability 0.5`` by default; their
"proportion" mode compresses a random share of images, the rest stay raw).

    python -m atcd_ray.write_ffcv cifar10 --split train --out /data/cifar10/train.beton
    python -m atcd_ray.write_ffcv imagenet --data-dir /data/imagenet --split val --out val.beton
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .cli import ArgumentParser, run_main
from .config import ConfigError
from .data import DATASETS
from .data.sources import IN_MEMORY, imagenet_folder


class _InMemory:
    """uint8 NCHW tensors as an indexed dataset of (HWC array, label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def write(dataset: str, split: str, out: str | Path, *, data_dir: str | None = None, max_resolution: int = 256,
          jpeg_quality: int = 90, compress_probability: float = 0.5, workers: int = 2) -> Path:
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    train = split == "train"
    if dataset == "imagenet":
        source = imagenet_folder(data_dir, train)
        image = RGBImageField(write_mode="proportion", max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                              compress_probability=compress_probability)
    else:
        source = _InMemory(*IN_MEMORY[dataset](data_dir, train))
        spec = DATASETS[dataset]
        image = (RGBImageField(write_mode="raw") if spec.in_channels == 3
                 else NDArrayField(np.dtype("uint8"), (spec.image_size, spec.image_size, 1)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a crash leaves no half-written .beton under the real name
    DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=workers).from_indexed_dataset(source)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m atcd_ray.write_ffcv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help=f"one of: {', '.join(d for d in DATASETS if d != 'digits')}")
    p.add_argument("--split", required=True, choices=["train", "val"], help="val = the test split")
    p.add_argument("--out", required=True, help="the .beton file to write")
    p.add_argument("--data-dir", help="where the dataset lives (default: the dataset's)")
    p.add_argument("--max-resolution", type=int, default=256, help="ImageNet: longest side kept")
    p.add_argument("--jpeg-quality", type=int, default=90, help="ImageNet")
    p.add_argument("--compress-probability", type=float, default=0.5, help="ImageNet: share stored as JPEG")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.dataset not in DATASETS or args.dataset == "digits":
        raise ConfigError(f"dataset: {args.dataset!r} has no FFCV writer; allowed: "
                          f"{', '.join(d for d in DATASETS if d != 'digits')}")
    if not (0 < args.jpeg_quality <= 100 and 0 <= args.compress_probability <= 1 and args.max_resolution > 0):
        raise ConfigError("need 0 < --jpeg-quality <= 100, 0 <= --compress-probability <= 1, --max-resolution > 0")
    path = write(args.dataset, args.split, args.out, data_dir=args.data_dir, max_resolution=args.max_resolution,
                 jpeg_quality=args.jpeg_quality,
                 compress_probability=args.compress_probability, workers=args.workers)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
