"""bench/: vocab_sweep.py (option checking, a tiny sweep's outputs, the loss agreement check), the
shared metadata, and the throughput scripts (bench/throughput.py, bench/throughput_fsdp.py).

The scripts are loaded from their files (bench/ is not a package); their sibling imports (``_meta``,
``_sweep_impls``) resolve through ``sys.modules``, where ``helpers.load_bench`` registers each module it loads.
"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import BENCH, load_bench


_meta = load_bench("_meta")
sweep_impls = load_bench("_sweep_impls")
vocab_sweep = load_bench("vocab_sweep")

TINY = ["--tokens", "64", "--d-student", "32", "--d-teacher", "48", "--repeats", "1", "--warmup", "0",
        "--device", "cpu", "--no-progress"]
REQUIRED_TOP = ("device", "torch", "triton", "commit", "date", "rows")
REQUIRED_ROW = ("impl", "vocab", "tokens", "d_student", "d_teacher", "dtype", "top_k", "keep_ratio", "fwd_ms",
                "fwd_bwd_ms", "peak_extra_mb")


@pytest.mark.parametrize("argv, message", [
    (["--impls", "naive,fastest"], "unknown implementation(s) 'fastest'"),
    (["--impls", ""], "give at least one of"),
    (["--tokens", "0"], "must be positive, got 0"),
    (["--tokens", "-8"], "must be positive, got -8"),
    (["--vocab", "32000,0"], "must be positive, got 0"),
    (["--vocab", "32000,abc"], "expected a whole number, got 'abc'"),
    (["--d-student", "0"], "must be positive"),
    (["--d-teacher", "-1"], "must be positive"),
    (["--repeats", "0"], "must be positive"),
    (["--top-k", "0"], "must be positive"),
    (["--keep-ratio", "0"], "must be in (0, 1]"),
    (["--keep-ratio", "1.5"], "must be in (0, 1]"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--vocab", "1000", "--top-k", "2000"], "larger than the smallest vocabulary size 1000"),
    (["--name", "a/b"], "--name must be a plain file stem"),
])
def test_bad_options_exit_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        vocab_sweep.main(argv + ["--out", str(tmp_path), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "vocab_sweep.py: error:" in err and message in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_cuda_device_without_gpu_is_refused(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exc:
        vocab_sweep.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_only_unavailable_implementations_says_why(capsys, tmp_path):
    code = vocab_sweep.main(TINY + ["--vocab", "1000", "--impls", "triton,cuda", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 2
    assert "skipping triton: the triton backend runs on a CUDA GPU" in out.out
    assert "skipping cuda:" in out.out
    assert "nothing to run" in out.err


def test_tiny_sweep_writes_json_csv_png(capsys, tmp_path):
    # every implementation requested: the GPU ones (and liger, unless installed) are skipped with a reason.
    # In-process here for speed; test_worker_process_measures_one_case covers the worker processes.
    code = vocab_sweep.main(TINY + ["--vocab", "1000", "--impls", ",".join(sweep_impls.IMPLS), "--isolate", "none",
                                    "--out", str(tmp_path), "--name", "tiny"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "skipping triton:" in out and "skipping cuda:" in out
    doc = json.loads((tmp_path / "tiny.json").read_text())
    for key in REQUIRED_TOP:
        assert key in doc, key
    ran = {"naive", "torch", "gemm"} | ({"liger"} if sweep_impls.available("liger", torch.device("cpu"))[0]
                                           else set())
    assert {r["impl"] for r in doc["rows"]} == ran
    assert set(doc["skipped"]) >= {"triton", "cuda"}
    for row in doc["rows"]:
        assert not row.get("error"), row
        for key in REQUIRED_ROW:
            assert key in row, key
        assert row["vocab"] == 1000 and row["tokens"] == 64 and row["dtype"] == "float32"
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert row["peak_extra_mb"] is not None and row["peak_extra_mb"] >= 0
        assert row["fwd_bwd_tflops"] > 0
    gemm = next(r for r in doc["rows"] if r["impl"] == "gemm")
    assert gemm["fwd_ratio_gemm"] == pytest.approx(1.0)
    for impl in ran - {"gemm"}:
        assert doc["agreement"][impl]["ok"], doc["agreement"][impl]
    with (tmp_path / "tiny.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"])
    assert set(REQUIRED_ROW) <= set(rows[0])
    png = (tmp_path / "tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| torch | 1,000 |" in (tmp_path / "tiny.md").read_text()


def test_worker_process_measures_one_case():
    # the CPU default: each (implementation, V) in a fresh process, peak memory from its RSS high-water mark
    spec = {"impl": "torch", "vocab": 2000, "tokens": 64, "d_student": 32, "d_teacher": 48,
            "dtype": "float32", "top_k": 16, "keep_ratio": 0.05, "repeats": 1, "warmup": 0, "device": "cpu",
            "liger_compiled": False, "threads": 1}
    result = vocab_sweep.run_isolated(spec, timeout=120)
    assert not result.get("error"), result
    assert result["fwd_ms"] > 0 and result["fwd_bwd_cpu_ms"] > 0 and result["memory_method"] == "rss-hwm"
    assert result["grad_output_mb"] == pytest.approx((64 * 32 + 2000 * 32) * 4 / 2**20)
    assert result["peak_extra_mb"] >= result["peak_extra_fwd_mb"] >= 0
    assert result["peak_total_fwd_bwd_mb"] + 1.0 >= result["peak_extra_mb"]  # page-level noise


@pytest.mark.parametrize("impl", ["naive", "torch", "liger"])
def test_loss_agreement_with_reference(impl):
    ok, reason = sweep_impls.available(impl, torch.device("cpu"))
    if not ok:
        pytest.skip(reason)
    result = sweep_impls.agreement(impl, torch.device("cpu"), top_k=16, keep_ratio=0.1, liger_compiled=False)
    assert result["ok"], result
    assert result["rel_err"] < 1e-4 and result["grad_w_rel_err"] < 1e-3


def test_agreement_check_catches_a_wrong_loss(monkeypatch):
    forward = sweep_impls.Case.forward
    monkeypatch.setattr(sweep_impls.Case, "forward", lambda self: forward(self) * 1.001)
    result = sweep_impls.agreement("torch", torch.device("cpu"), top_k=16, keep_ratio=0.05,
                                   liger_compiled=False)
    assert not result["ok"] and result["rel_err"] == pytest.approx(1e-3, rel=1e-2)


def test_naive_matches_torch_backend_selection_at_a_larger_vocabulary():
    cfg = sweep_impls.Config(tokens=96, d_student=24, d_teacher=40, vocab=9000, dtype=torch.float32)
    inputs = sweep_impls.make_inputs(cfg, torch.device("cpu"), seed=3)
    naive = sweep_impls.Case("naive", cfg, inputs).forward()
    torch_loss = sweep_impls.Case("torch", cfg, inputs).forward()
    assert float(naive.detach()) == pytest.approx(float(torch_loss.detach()), rel=1e-5)


def test_gemm_flops_model():
    cfg = sweep_impls.Config(tokens=100, d_student=10, d_teacher=20, vocab=1000, dtype=torch.float32,
                             keep_ratio=0.05)
    fwd, fwd_bwd = sweep_impls.flops("gemm", cfg)
    assert fwd == 2 * 100 * 1000 * 30
    assert fwd_bwd == fwd + 2 * 5 * 1000 * 30 + 4 * 5 * 1000 * 10
    assert sweep_impls.flops("liger", cfg) == (fwd + 4 * 100 * 1000 * 10,) * 2


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["naive", "torch", "triton", "cuda", "liger"])
def test_loss_agreement_on_gpu(impl):
    device = torch.device("cuda")
    ok, reason = sweep_impls.available(impl, device)
    if not ok:
        pytest.skip(reason)
    result = sweep_impls.agreement(impl, device, top_k=16, keep_ratio=0.1, liger_compiled=False)
    assert result["ok"], result


@pytest.mark.gpu
def test_tiny_sweep_on_gpu(capsys, tmp_path):
    code = vocab_sweep.main(["--device", "cuda", "--vocab", "4096", "--tokens", "128", "--d-student", "64",
                             "--d-teacher", "96", "--repeats", "2", "--warmup", "1", "--no-progress",
                             "--liger-compiled", "off", "--out", str(tmp_path), "--name", "tiny_gpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads((tmp_path / "tiny_gpu.json").read_text())
    assert doc["memory_method"] == "cuda-allocator-peak"
    for row in doc["rows"]:
        assert not row.get("error"), row
        assert row["fwd_bwd_ms"] > 0 and row["peak_extra_mb"] >= 0


def test_metadata_keys():
    meta = _meta.metadata("cpu")
    for key in ("device", "python", "torch", "triton", "transformers", "liger_kernel", "commit", "date"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__ and meta["commit"]


def test_throughput_script_fails_cleanly_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    throughput = load_bench("throughput")
    assert throughput.main(["--out", str(tmp_path / "tp.json")]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "tp.json").exists()


def test_throughput_fsdp_smoke(tmp_path):
    """bench/throughput_fsdp.py: the sharded path at world size 1 (one-process group, no torchrun)."""
    out = tmp_path / "tp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "throughput_fsdp.py"), "--preset", "tiny",
                           "--device", "cpu", "--dtype", "fp32", "--steps", "1", "--warmup", "0",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["sharded"] and summary["world_size"] == 1
    assert summary["step_s"] > 0 and summary["response_tokens_per_s"] > 0 and summary["commit"]


def test_bundled_architectures_are_the_only_qwen3_shapes():
    fsdp = load_bench("throughput_fsdp")
    assert not hasattr(fsdp, "QWEN3")
    with torch.device("meta"):
        model = fsdp.build("qwen3-1.7b", torch.bfloat16, torch.device("meta"), 0, "sdpa")
    assert model.config.hidden_size == 2048 and model.config.num_hidden_layers == 28


def test_gpu_check_writes_each_stage_status_as_it_goes(tmp_path):
    """bench/gpu_check.sh on a machine without a GPU: every stage reports its status in summary.json
    (stages skipped by name are recorded as such), env.json carries the metadata, nothing hangs."""
    import json
    import os
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DEADLINE_S="60",
               GPU_CHECK_SKIP="install,headline,pytest,sweep,throughput")
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["stage"]: s["status"] for s in summary["stages"]}
    assert stages["env"] == "ok" and stages["headline"] == "skipped"
    assert list(stages) == ["env", "install", "headline", "pytest", "sweep", "throughput"]
    assert {"device", "driver", "cuda", "torch", "triton", "commit", "date"} <= set(summary["env"])
