"""bench/trl_comparison.py runs end to end on tiny sizes and writes its JSON and table."""

import json

import pytest

from helpers import load_bench

pytest.importorskip("trl")
load_bench("_meta")
load_bench("vocab_sweep")
trl_comparison = load_bench("trl_comparison")


def test_trl_comparison_small(tmp_path):
    assert trl_comparison.main(["--tokens", "16", "--vocab", "1500", "--d-student", "16", "--d-teacher", "24",
                                "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "trl_comparison_cpu.json").read_text())
    assert set(report["results"]) == {"trl_chunked_divergence", "taopd_full_opd", "taopd_ta_opd_5pct"}
    assert report["agreement_full_opd_vs_trl"]["per_token_kl_max_abs_diff"] < 1e-4
    assert report["commit"] and report["machine"]["threads"] == 1
    assert "| taopd_full_opd |" in (tmp_path / "trl_comparison_cpu.md").read_text()
