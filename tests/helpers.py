"""Input builders and the precision rule shared by the test files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from taopd_kernels.reference import reference_logits, reference_row_stats

STAT_FIELDS = ("lse_student", "lse_teacher", "entropy_student", "kl_reverse", "kl_forward",
               "teacher_mass", "disagreement")


def make_inputs(n=48, d_s=16, d_t=24, v_s=517, v_t=None, *, dtype=torch.float32, seed=0, scale=3.0,
                bias=False, leading=None, device="cpu"):
    """Random hidden states and lm_head weights whose logits have std ~ ``scale``."""
    v_t = v_s if v_t is None else v_t
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if leading is None else tuple(leading)
    out = {
        "student_hidden": torch.randn(*shape, d_s, generator=g),
        "student_weight": torch.randn(v_s, d_s, generator=g) * scale / d_s ** 0.5,
        "teacher_hidden": torch.randn(*shape, d_t, generator=g),
        "teacher_weight": torch.randn(v_t, d_t, generator=g) * scale / d_t ** 0.5,
    }
    # Make teacher and student related, so top-K sets overlap as in real distillation.
    k = min(d_s, d_t)
    out["teacher_hidden"][..., :k] = out["teacher_hidden"][..., :k] * 0.5 + out["student_hidden"][..., :k] * 0.5
    v = min(v_s, v_t)
    out["teacher_weight"][:v, :k] = out["teacher_weight"][:v, :k] * 0.5 + out["student_weight"][:v, :k] * 0.5
    if bias:
        out["student_bias"] = torch.randn(v_s, generator=g) * 0.5
        out["teacher_bias"] = torch.randn(v_t, generator=g) * 0.5
    return {name: t.to(device=device, dtype=dtype) for name, t in out.items()}


def truth_rows(inputs, *, vocab_size=None, top_k=16, temperature=1.0, sampled_ids=None):
    """float64 ground-truth statistics for ``make_inputs`` output (flattened rows)."""
    vocab_size = vocab_size or min(inputs["student_weight"].shape[0], inputs["teacher_weight"].shape[0])
    zs = reference_logits(inputs["student_hidden"], inputs["student_weight"], inputs.get("student_bias"),
                          vocab_size, temperature, torch.float64)
    zt = reference_logits(inputs["teacher_hidden"], inputs["teacher_weight"], inputs.get("teacher_bias"),
                          vocab_size, temperature, torch.float64)
    y = None if sampled_ids is None else sampled_ids.reshape(-1)
    return reference_row_stats(zs, zt, top_k, y)


def naive_rows(inputs, dtype, *, vocab_size=None, top_k=16, temperature=1.0):
    """What a user would get by computing the logits in ``dtype`` (e.g. bf16 matmul output)."""
    vocab_size = vocab_size or min(inputs["student_weight"].shape[0], inputs["teacher_weight"].shape[0])
    zs = reference_logits(inputs["student_hidden"], inputs["student_weight"], inputs.get("student_bias"),
                          vocab_size, temperature, dtype)
    zt = reference_logits(inputs["teacher_hidden"], inputs["teacher_weight"], inputs.get("teacher_bias"),
                          vocab_size, temperature, dtype)
    return reference_row_stats(zs.float(), zt.float(), top_k)


def max_err(a, b, mask=None):
    a = a.reshape(-1).double()
    b = b.reshape(-1).double()
    if mask is not None:
        a, b = a[mask.reshape(-1)], b[mask.reshape(-1)]
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_stats_close(stats, truth, *, atol=2e-5, rtol=2e-5, mask=None, fields=STAT_FIELDS, check_ids=True):
    """Every statistic of ``stats`` (TeachabilityStats or RowStats) against float64 ``truth`` rows.

    With ``mask``, only the masked positions of ``stats`` are compared; ``truth`` may hold either all
    positions or only the masked ones.
    """
    mask = None if mask is None else mask.reshape(-1)
    for name in fields:
        got = getattr(stats, name).reshape(-1)
        want = getattr(truth, name).reshape(-1)
        if mask is not None:
            got = got[mask]
            want = want[mask] if want.shape[0] == mask.shape[0] else want
        torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if check_ids:
        for name in ("topk_ids_student", "topk_ids_teacher"):
            want = getattr(truth, name)
            got = getattr(stats, name).reshape(-1, want.shape[-1])
            if mask is not None:
                got = got[mask]
                want = want[mask] if want.shape[0] == mask.shape[0] else want
            assert torch.equal(got, want), f"{name} differs from the reference"


BENCH = Path(__file__).resolve().parents[1] / "bench"


EXAMPLES = BENCH.parent / "examples"


def _load_file(name: str, folder: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_bench(name: str):
    """bench/<name>.py as the module ``name``, registered in sys.modules as a script's siblings are (so its
    own ``import sweep_impls``-style imports resolve), without editing sys.path."""
    return _load_file(name, BENCH)


def load_example(name: str):
    """examples/<name>.py as a module (its ``main`` is not run)."""
    return _load_file(name, EXAMPLES)


def tied_selection_inputs(n_total: int = 19):
    """Selection inputs with many ties (few distinct values), 4 sequences (of the first 19 positions), some
    invalid positions: (entropy, disagreement, teacher_mass, valid, sequence_ids)."""
    g = torch.Generator().manual_seed(5)
    ent = torch.randint(0, 4, (n_total,), generator=g).float() / 3
    dis = torch.randint(0, 3, (n_total,), generator=g).float()
    mass = torch.randint(0, 3, (n_total,), generator=g).float() / 2
    valid = torch.rand(n_total, generator=g) > 0.2
    seq = torch.tensor([0] * 5 + [1] * 4 + [2] * 6 + [3] * 4)
    return ent, dis, mass, valid, seq
