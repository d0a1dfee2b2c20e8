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
        return torch.cuda.get_device_name(device)
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


def metadata(device) -> dict:
    """``{"device", "python", "torch", "triton", "transformers", "liger_kernel", "commit", "date"}``."""
    return {"device": device_name(device), **versions(), "commit": git_commit(), "date": now()}
