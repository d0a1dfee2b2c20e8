"""Every script under bench/ and examples/, and bench/gpu_check.sh, runs in its CPU smoke mode.

The convention (bench/README.md, "Smoke mode"): ``python <script> --smoke`` (``bash bench/gpu_check.sh
--smoke``) is the same command at tiny shapes, few repeats, on the CPU, running every stage that can run
without CUDA; a GPU-only stage at least imports every function it will call. Results go to a temporary
folder (``$TMPDIR`` unless ``--out`` says otherwise), never to bench/results/.

Scripts are discovered, not listed: a new ``*.py`` in bench/ or examples/ whose name does not start with
``_`` (private modules such as ``_meta.py``) must have a smoke mode, or this test fails. Each runs as a
subprocess, as a user runs it, so its imports are resolved as they would be on the GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH, EXAMPLES = ROOT / "bench", ROOT / "examples"
SCRIPTS = sorted(p for folder in (BENCH, EXAMPLES) for p in folder.glob("*.py") if not p.name.startswith("_"))
GPU_CHECK = BENCH / "gpu_check.sh"
TIMEOUT_S = 300


def _results_listing() -> dict:
    """bench/results/: every file with its size and modification time (a smoke run must not touch it)."""
    folder = BENCH / "results"
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def _smoke_env(tmp_path: Path) -> dict:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # TMPDIR: where a smoke run's default outputs go. Triton kernels, where a stage runs them, interpret.
    return dict(os.environ, TMPDIR=str(tmp), TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(cmd: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    before = _results_listing()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env or _smoke_env(tmp_path), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{' '.join(cmd[1:])} exited with {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    assert _results_listing() == before, "a smoke run wrote to bench/results/"
    return proc


def test_every_script_is_discovered():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"bench/vocab_sweep.py", "bench/cuda_stats_bench.py", "bench/throughput.py", "bench/throughput_fsdp.py",
            "bench/trl_comparison.py", "bench/core_vs_reference.py", "examples/trl_ta_opd.py"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_runs_in_smoke_mode(script, tmp_path):
    _run([sys.executable, str(script), "--smoke"], tmp_path)


def test_gpu_check_runs_every_stage_in_smoke_mode(tmp_path):
    out = tmp_path / "out"
    env = dict(_smoke_env(tmp_path), OUT=str(out))
    env.pop("GPU_CHECK_SKIP", None)
    proc = _run(["bash", str(GPU_CHECK), "--smoke"], tmp_path, env)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s["status"] for s in summary["stages"]}
    assert list(stages) == ["env", "install", "headline", "pytest", "sweep", "throughput"], stages
    assert set(stages.values()) == {"ok"}, (stages, proc.stdout[-3000:])
    collected = (out / "pytest_gpu.txt").read_text()
    assert "test_triton.py" in collected and "test_cuda.py" in collected, collected[-2000:]
