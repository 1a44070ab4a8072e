"""Where ATCD's time goes beyond its passes on a GPU: ATCD-2-2 on PreActResNet18 (batch 512) with
its M-H correction's row re-run (the CPU default), with fewer re-run rows, with the whole batch
re-run (the CUDA default), and with M-H off, each beside the bare loop; then torch.profiler's top
operations of one step with the row re-run.

    python benchmarks/gpu_atcd_overhead.py --out runs/gpu-atcd-overhead     # on a CUDA machine
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as gt  # noqa: E402

from atcd_ray.core.engine import autocast  # noqa: E402
from atcd_ray.core.methods import METHODS  # noqa: E402
from atcd_ray.core.models import build_model  # noqa: E402

VARIANTS = {  # label: ATCD-2-2 options
    "atcd-2-2": {"mh_rerun": "rows"},  # the row re-run, a quarter of the minibatch on CUDA
    "atcd-2-2 capacity 0.05": {"mh_rerun": "rows", "rerun_capacity": 0.05},
    "atcd-2-2 mh_rerun=batch": {"mh_rerun": "batch"},
    "atcd-2-2 mh off": {"mh": False},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="eager,cl+bf16")
    p.add_argument("--model", choices=list(gt.SHAPES), default="preactresnet18")
    p.add_argument("--labels", default=",".join(VARIANTS), help="which of the ATCD-2-2 variants")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-profile", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    for label, options in VARIANTS.items():
        gt.RUNS[label] = ("atcd", {"T": 2, "K": 2, **options}, (2, 2))
    rows = []
    for variant in args.variants.split(","):
        for row in gt.steps_per_second(args.model, gt.SHAPES[args.model], variant, args.labels.split(","),
                                       device=device, steps=args.steps, rounds=3, compile_backend="inductor"):
            print(row, flush=True)
            rows.append(row)
    gt.print_tables(rows)
    if args.skip_profile:
        return
    size, batch, classes, eps = gt.SHAPES["preactresnet18"]
    model = build_model("preactresnet18", classes, 3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = model.to(device, memory_format=torch.channels_last)
    method = METHODS["atcd"](model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), eps,
                             METHODS["atcd"].Options(T=2, K=2, mh_rerun="rows"))
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    for _ in range(3):
        with autocast(True, device):
            method.step(x, y)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            with autocast(True, device):
                method.step(x, y)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    (out / "profile.txt").write_text(table + "\n\n" + table_cpu)
    print(table)
    print(table_cpu)


if __name__ == "__main__":
    main()
