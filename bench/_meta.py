"""The metadata every benchmark result carries: device, versions, git commit, date.

    from _meta import metadata
    result = {**metadata(device), ...}

(bench/ is the script's folder, so ``_meta`` imports as a sibling module.)
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout (12-digit hash), or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=HERE,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    """python, torch, triton, transformers and liger-kernel versions (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for key, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                      ("liger_kernel", "liger-kernel")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    import torch

    out["torch"] = torch.__version__  # the running build (e.g. 2.x+cu128), not only the distribution's
    return out


def device_name(device) -> str:
    """The GPU's name, or the CPU model with the number of torch threads."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def driver_version() -> str:
    """The NVIDIA driver version (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(device) -> dict:
    """``{"device", "driver", "cuda", "python", "torch", "triton", "transformers", "liger_kernel", "commit",
    "date"}``."""
    import torch

    return {"device": device_name(device), "driver": driver_version(), "cuda": torch.version.cuda, **versions(),
            "commit": git_commit(), "date": now()}


if __name__ == "__main__":  # python bench/_meta.py [cuda|cpu]: the metadata as JSON (gpu_check.sh's env stage)
    import json
    import sys

    print(json.dumps(metadata(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=1))
