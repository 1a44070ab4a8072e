"""What produced a run: the code (git commit, versions) and the hardware, as summary.json records them."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (none where there is no such file)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str | None:
    """Vendor, family, model and stepping: a cloud VM's model name ("AMD EPYC") hides the
    generation, and with it the speed of the seconds a summary records."""
    fields = _cpuinfo()
    if "vendor_id" not in fields:
        return None
    return f"{fields['vendor_id']} family {fields.get('cpu family')} model {fields.get('model')} " \
           f"stepping {fields.get('stepping')}"


def provenance(root: Path | None = None) -> dict:
    """What produced a run: the git commit of this checkout (and whether tracked files differ from
    it), or ATCD_RAY_COMMIT where there is no checkout (an image); the versions that matter."""
    root = root or Path(__file__).resolve().parent.parent
    commit, dirty = os.environ.get("ATCD_RAY_COMMIT"), None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout
    versions = {"python": platform.python_version()}
    for package in ("atcd_ray", "torch", "torchvision", "ray", "ffcv"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"commit": commit, "dirty": dirty, "versions": versions}


def hardware() -> dict:
    info = {"torch": torch.__version__, "cpu": cpu_name(), "cpu_id": cpu_id(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
