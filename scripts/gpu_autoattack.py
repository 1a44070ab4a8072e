"""A budget study's AutoAttack on a GPU machine that shares no filesystem with this one and has
no Ray: what this project's lent GPU machines are (their own torch; at most 64 MiB travels).

    python scripts/gpu_autoattack.py stage runs/fashion-mnist-budget data/aa-stage
    # on the GPU machine, from the repository root (data/ is git-ignored: carry data/aa-stage):
    PYTHONPATH=data/aa-stage/site python3 -m atcd_ray.study tune_spaces/fashion-mnist_budget.yaml \\
        --stage autoattack --out data/aa-stage --jobs 6 --data-dir data/aa-stage/data
    # back here, with data/aa-stage as it came back:
    python scripts/gpu_autoattack.py collect data/aa-stage runs/fashion-mnist-budget

``stage`` writes, for every final run that has a summary and no ``autoattack.json``, a
weights-only copy of its checkpoint (``save_weights_only``: a third of the size) and its
summary, with ``source.json`` naming the checkpoint it was copied from and that file's sha256;
beside them the study's spec record, the test files of the dataset (Fashion-MNIST's IDX files,
from the runs' data directory) and the packages the evaluation needs beyond torch and numpy
(pyautoattack, torchattacks, safetensors with its abi3 extension, PyYAML). ``collect`` copies each
``autoattack.json`` back into its run once every target is checked (the run's checkpoint still has
the sha256 that was staged), adding ``evaluated_copy_of`` (source.json; the weights evaluated are
the run's, bit for bit, which ``stage`` checks) and making ``provenance`` the commit of the tree
that was staged (commit first: the tree travels as it is), the GPU machine's own record kept as
``device_provenance`` (its copy of ``.git`` may be stale).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import torch

from atcd_ray.core.checkpoint import Checkpoint, save_weights_only, write_json_atomic
from atcd_ray.data.sources import FASHION_MNIST_DIR
from atcd_ray.evaluate import file_sha256
from atcd_ray.provenance import provenance

# What atcd_ray.evaluate imports beyond torch and numpy (AutoAttack: pyautoattack; torchattacks'
# PGD; checkpoints: safetensors; configs: PyYAML), as import name -> distribution name. On
# PYTHONPATH they come before the GPU machine's own copies, if it has any.
PACKAGES = {"pyautoattack": "pyautoattack", "torchattacks": "torchattacks", "safetensors": "safetensors",
            "yaml": "PyYAML"}
TEST_FILES = {"fashion-mnist": (FASHION_MNIST_DIR, "t10k-*")}  # dataset: (default directory, test files)


def stage(study: Path, to: Path, runs_glob: str) -> int:
    dataset = json.loads((study / "budget_study.json").read_text())["dataset"]
    if dataset not in TEST_FILES:
        raise SystemExit(f"stage: only {', '.join(TEST_FILES)} are staged; {dataset}'s test files are not known here")
    runs, data_dirs = 0, set()
    for summary_path in sorted((study / "final").glob(f"{runs_glob}/summary.json")):
        run = summary_path.parent
        if (run / "autoattack.json").exists():
            continue
        summary = json.loads(summary_path.read_text())
        source = run / summary["checkpoint"]
        staged = to / run.relative_to(study)
        staged.mkdir(parents=True, exist_ok=True)
        save_weights_only(source, staged / "weights.safetensors")
        original, copy = Checkpoint(source), Checkpoint(staged / "weights.safetensors")
        weights, copied = original.model_state(), copy.model_state()
        if weights.keys() != copied.keys() or not all(torch.equal(weights[k], copied[k]) for k in weights):
            raise RuntimeError(f"{staged}: the weights-only copy differs from {source}")
        data_dirs.add(original.config["data"]["dir"] or TEST_FILES[dataset][0])
        (staged / "summary.json").write_text(json.dumps({**summary, "checkpoint": "weights.safetensors"}, indent=2))
        (staged / "source.json").write_text(json.dumps({"checkpoint": str(source.resolve()),
                                                        "sha256": file_sha256(source)}, indent=2) + "\n")
        runs += 1
    shutil.copy(study / "budget_study.json", to / "budget_study.json")
    # The code that will evaluate is this tree as it travels: its commit, recorded here (a copy of
    # the tree elsewhere may carry stale git metadata, which evaluate's own provenance would read).
    (to / "stage.json").write_text(json.dumps({"code": provenance()}, indent=2) + "\n")
    if len(data_dirs) > 1:
        raise SystemExit(f"stage: the runs read their data from several directories ({sorted(data_dirs)})")
    (to / "data").mkdir(exist_ok=True)
    pattern = TEST_FILES[dataset][1]
    for data_dir in data_dirs:
        files = list(Path(data_dir).glob(pattern))
        if not files:
            raise SystemExit(f"stage: no {pattern} files in {data_dir}, the runs' data directory")
        for f in files:
            shutil.copy(f, to / "data" / f.name)
    for name, distribution in PACKAGES.items():
        module = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(module, to / "site" / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "examples"))  # pyautoattack's: 44 MB
        # Its dist-info too: evaluate records the version from it.
        metadata = [f for f in importlib.metadata.distribution(distribution).files or [] if f.name == "METADATA"]
        if not metadata:
            raise SystemExit(f"stage: {distribution} is installed without a dist-info METADATA file; reinstall it")
        info = Path(metadata[0].locate()).parent
        shutil.copytree(info, to / "site" / info.name, dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in to.rglob("*") if f.is_file())
    print(f"stage: {runs} runs, {size / 2**20:.1f} MiB in {to}")
    return 0


def collect(staged_study: Path, study: Path) -> int:
    code = json.loads((staged_study / "stage.json").read_text())["code"]
    results = []
    for aa_json in sorted((staged_study / "final").glob("*/*/*/seed*/autoattack.json")):
        run = study / aa_json.parent.relative_to(staged_study)
        source = json.loads((aa_json.parent / "source.json").read_text())
        if (run / "autoattack.json").exists():
            raise SystemExit(f"collect: {run / 'autoattack.json'} exists; not replaced")
        summary = json.loads((run / "summary.json").read_text())
        if file_sha256(run / summary["checkpoint"]) != source["sha256"]:
            raise SystemExit(f"collect: {run / summary['checkpoint']} is not the checkpoint that was staged "
                             "(its sha256 differs): retrained since?")
        result = json.loads(aa_json.read_text())
        result["evaluated_copy_of"] = source
        result["device_provenance"], result["provenance"] = result.get("provenance"), code
        results.append((run / "autoattack.json", result))
    for target, result in results:  # every target checked first: all or nothing
        write_json_atomic(target, result)
    print(f"collect: {len(results)} AutoAttack results into {study}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, first, second in [("stage", "study", "to"), ("collect", "staged_study", "study")]:
        command = sub.add_parser(name)
        command.add_argument(first, type=Path)
        command.add_argument(second, type=Path)
        if name == "stage":  # 36 runs of the Fashion-MNIST study come to about 61 MiB of the 64 that travel
            command.add_argument("--runs", default="*/*/*/seed*",
                                 help="which final runs, as MODEL/budgetB/METHOD/seedS (default: all)")
    args = p.parse_args(argv)
    if args.command == "stage":
        return stage(args.study, args.to, args.runs)
    return collect(args.staged_study, args.study)


if __name__ == "__main__":
    sys.exit(main())
