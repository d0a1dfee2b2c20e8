"""What every bench/ script shares: the metadata its results carry (device, versions, git commit, date)
and the smoke-mode convention.

    from _meta import metadata
    result = {**metadata(device), ...}

Smoke mode: every script under bench/ and examples/ takes ``--smoke`` (``add_smoke_option``), which runs
the same command at tiny shapes and few repeats on the CPU, every stage that can run without CUDA; a
GPU-only stage at least resolves every function it would call. Results a smoke run writes go to a fresh
temporary folder (``smoke_dir``) unless the command names one. tests/test_scripts_smoke.py runs them all.

(bench/ is the script's folder, so ``_meta`` imports as a sibling module.)
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import tempfile
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


SMOKE_HELP = ("a CPU smoke run of this command: tiny shapes, few repeats, the stages that run without CUDA, "
              "results in a temporary folder unless one is given")


def add_smoke_option(parser) -> None:
    """``--smoke`` on an argparse parser, with the one help text every script shares."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def smoke_dir(script: str) -> Path:
    """A fresh temporary folder (under $TMPDIR) for a smoke run's results: never bench/results/."""
    return Path(tempfile.mkdtemp(prefix=f"{script}-smoke-"))


if __name__ == "__main__":  # python bench/_meta.py [cuda|cpu]: the metadata as JSON (gpu_check.sh's env stage)
    import json
    import sys

    print(json.dumps(metadata(sys.argv[1] if len(sys.argv) > 1 else "cpu"), indent=1))
