"""The implementations that ``vocab_sweep.py`` measures, their availability, FLOP model and loss check.

Every implementation is a ``Case`` built on one set of inputs (h_s [N, D_s] and W_s [V, D_s] with
requires_grad, h_t [N, D_t] and W_t [V, D_t] without):

- ``forward()`` runs what a training step runs before ``backward`` (autograd graph recorded) and
  returns the loss (gemm: the two logits tensors);
- ``forward_backward()`` runs forward and the backward, and returns the gradient tensors it made
  (freshly allocated by ``torch.autograd.grad``, so nothing accumulates across repeats); the sweep
  excludes their bytes from the peak-memory figure.

naive     what a user would write: both [N, V] logits, log_softmax, topk, the statistics of docs/math.md
          (Per-position statistics), the selection (Scores and selection) and the masked reverse-KL loss; autograd backward.
torch     ``fused_teachability_kl(..., backend="torch")`` (the PyTorch backend).
triton    ``fused_teachability_kl(..., backend="triton")`` (GPU).
cuda      ``fused_teachability_kl(..., backend="cuda")`` (CUDA statistics kernel, cuBLAS GEMMs; GPU).
liger     Liger-Kernel's ``LigerFusedLinearJSDLoss`` with beta=1 (reverse KL), weight_hard_loss=0,
          weight_soft_loss=1: full-token reverse KL (no selection). Liger computes the gradients
          inside its forward, so its forward time already holds the backward's work.
gemm      the bare GEMMs: forward = both logits GEMMs; forward+backward adds what a kept-row
          backward needs (recompute both models' logits for the kept rows, then dh = G W_s and
          dW = G^T h_s). The floor every fused implementation is compared to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Every library function an implementation calls, imported here so that a rename fails on import (the CPU
# smoke run included), not on the GPU machine.
from taopd_kernels import backend_available, fused_teachability_kl, select_top, strategy_scores
from taopd_kernels.reference import reference_teachability_kl

IMPLS = ("naive", "torch", "triton", "cuda", "liger", "gemm")
GPU_ONLY = ("triton", "cuda")
LIGER_HINT = ("liger-kernel is not installed (pip install liger-kernel==0.8.5; offline: see bench/README.md, "
              "'Liger-Kernel wheel')")


@dataclass
class Config:
    tokens: int
    d_student: int
    d_teacher: int
    vocab: int
    dtype: torch.dtype
    top_k: int = 16
    keep_ratio: float = 0.05
    liger_compiled: bool = False
    chunk_rows: Optional[int] = None
    chunk_vocab: Optional[int] = None


def kept_count(tokens: int, keep_ratio: float) -> int:
    """n = max(1, ceil(rho * N)) (one sequence, every position valid), as docs/math.md, Scores and selection."""
    return max(1, math.ceil(round(keep_ratio * tokens, 9)))


def flops(impl: str, cfg: Config) -> tuple[float, float]:
    """GEMM FLOPs that the task needs, for the forward and for forward+backward.

    TA-OPD implementations (naive, torch, triton, cuda, gemm) are all charged the gemm floor:
    forward 2 N V (D_s + D_t); backward, for the n kept rows, 2 n V (D_s + D_t) to recompute
    their logits plus 2 * 2 n V D_s for dh and dW. So TFLOP/s is comparable across them (naive,
    which back-propagates through every row, is charged only the useful work). Liger's task is the
    full-token loss: 2 N V (D_s + D_t) + 2 * 2 N V D_s, all of it in its forward.
    """
    n, v, ds, dt = cfg.tokens, cfg.vocab, cfg.d_student, cfg.d_teacher
    fwd = 2.0 * n * v * (ds + dt)
    if impl == "liger":
        total = fwd + 4.0 * n * v * ds
        return total, total
    k = kept_count(n, cfg.keep_ratio)
    return fwd, fwd + 2.0 * k * v * (ds + dt) + 4.0 * k * v * ds


def available(impl: str, device: torch.device) -> tuple[bool, str]:
    """(ok, reason) for one implementation on one device. Never raises."""
    if impl not in IMPLS:
        return False, f"unknown implementation {impl!r}"
    if impl in ("naive", "torch", "gemm"):
        return True, ""
    if impl in GPU_ONLY:
        if device.type != "cuda":
            return False, f"the {impl} backend runs on a CUDA GPU; this run is on {device.type}"
        try:
            ok, reason = backend_available(impl, device)
        except Exception as exc:  # a half-written backend must not stop the sweep
            return False, f"the {impl} backend failed to load: {type(exc).__name__}: {exc}"
        return bool(ok), reason or ("" if ok else f"the {impl} backend is not available")
    # liger
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as exc:
        if isinstance(exc, ImportError) and "liger_kernel" in str(exc):
            return False, LIGER_HINT
        return False, f"liger-kernel failed to import: {type(exc).__name__}: {exc}"
    return True, ""


def make_inputs(cfg: Config, device: torch.device, seed: int = 0, logit_scale: float = 2.0):
    """Random inputs whose logits have standard deviation about ``logit_scale`` (peaked, like an LM's).

    The teacher's hidden states share a random projection of the student's, so the two
    distributions are related (non-trivial top-K overlap), as in distillation.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=cfg.dtype, device=device).mul_(scale)

    n, v, ds, dt = cfg.tokens, cfg.vocab, cfg.d_student, cfg.d_teacher
    with torch.no_grad():
        h_s = randn(n, ds)
        h_t = (h_s @ randn(ds, dt, scale=0.7 / math.sqrt(ds))).add_(randn(n, dt, scale=0.3))
        w_s = randn(v, ds, scale=logit_scale / math.sqrt(ds))
        w_t = randn(v, dt, scale=logit_scale / math.sqrt(dt))
    return h_s.requires_grad_(True), w_s.requires_grad_(True), h_t, w_t


def naive_loss(h_s, w_s, h_t, w_t, *, top_k: int, keep_ratio: float, strategy: str = "teachability"):
    """The TA-OPD loss head as a PyTorch user writes it: full logits for both models, then docs/math.md."""
    zs = (h_s @ w_s.T).float()
    with torch.no_grad():
        zt = (h_t @ w_t.T).float()
        logp_t = torch.log_softmax(zt, dim=-1)
    logp_s = torch.log_softmax(zs, dim=-1)
    p_s = logp_s.exp()
    kl_rev = (p_s * (logp_s - logp_t)).sum(-1)  # [N], differentiable
    with torch.no_grad():
        entropy = -(p_s * logp_s).sum(-1)
        ids_s = zs.topk(top_k, dim=-1).indices
        ids_t = zt.topk(top_k, dim=-1).indices
        teacher_mass = logp_t.gather(1, ids_s).exp().sum(-1)
        # local disagreement: forward KL of both distributions renormalised on S_s union S_t
        dup = (ids_t[:, :, None] == ids_s[:, None, :]).any(-1)
        union = torch.cat([ids_s, ids_t], 1)
        drop = torch.cat([torch.zeros_like(dup), dup], 1)
        zs_u = zs.gather(1, union).masked_fill(drop, -math.inf)
        zt_u = zt.gather(1, union).masked_fill(drop, -math.inf)
        lpb_s, lpb_t = torch.log_softmax(zs_u, -1), torch.log_softmax(zt_u, -1)
        pb_t = lpb_t.exp()
        disagreement = torch.where(pb_t > 0, pb_t * (lpb_t - lpb_s), torch.zeros_like(pb_t)).sum(-1)
        valid = torch.ones(zs.shape[0], dtype=torch.bool, device=zs.device)
        score = strategy_scores(strategy, entropy=entropy, disagreement=disagreement,
                                teacher_mass=teacher_mass, valid=valid)
        kept = valid.clone() if strategy == "all" else select_top(score, valid, keep_ratio=keep_ratio)
        m = kept.float()
    return (kl_rev * m).sum() / m.sum().clamp_min(1.0)


class Case:
    """One implementation on one set of inputs."""

    def __init__(self, impl: str, cfg: Config, inputs, strategy: str = "teachability"):
        self.impl, self.cfg, self.strategy = impl, cfg, strategy
        self.h_s, self.w_s, self.h_t, self.w_t = inputs
        self._loss_fn: Optional[Callable] = None
        if impl == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            self._liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                                  temperature=1.0, compiled=cfg.liger_compiled)
            self._labels = torch.zeros(cfg.tokens, dtype=torch.long, device=self.h_s.device)
        if impl == "gemm":
            k = kept_count(cfg.tokens, cfg.keep_ratio)
            # a fixed spread of kept rows (which rows does not change the GEMM cost)
            self._kept = torch.linspace(0, cfg.tokens - 1, k, device=self.h_s.device).round().long()

    def forward(self):
        impl, cfg = self.impl, self.cfg
        if impl == "naive":
            return naive_loss(self.h_s, self.w_s, self.h_t, self.w_t, top_k=cfg.top_k,
                              keep_ratio=cfg.keep_ratio, strategy=self.strategy)
        if impl in ("torch", "triton", "cuda"):
            loss, _ = fused_teachability_kl(self.h_s, self.w_s, self.h_t, self.w_t, top_k=cfg.top_k,
                                            keep_ratio=cfg.keep_ratio, strategy=self.strategy,
                                            backend=impl, chunk_rows=cfg.chunk_rows,
                                            chunk_vocab=cfg.chunk_vocab, check_finite=False)
            return loss
        if impl == "liger":
            return self._liger(self.h_s, self.w_s, self.h_t, self.w_t, self._labels)
        if impl == "gemm":
            with torch.no_grad():
                return self.h_s @ self.w_s.T, self.h_t @ self.w_t.T
        raise ValueError(impl)

    def forward_backward(self):
        if self.impl == "gemm":
            return self._gemm_forward_backward()
        loss = self.forward()
        return torch.autograd.grad(loss, [self.h_s, self.w_s])

    def _gemm_forward_backward(self):
        with torch.no_grad():
            zs, zt = self.forward()
            del zs, zt
            idx = self._kept
            hs_k = self.h_s.index_select(0, idx)
            g = hs_k @ self.w_s.T  # recomputed student logits; stands in for the logit gradient
            zt_k = self.h_t.index_select(0, idx) @ self.w_t.T  # recomputed teacher logits
            del zt_k
            d_h = torch.zeros_like(self.h_s)
            d_h.index_copy_(0, idx, g @ self.w_s)
            d_w = g.T @ hs_k
            return d_h, d_w


def grad_bytes(grads) -> int:
    return sum(g.numel() * g.element_size() for g in grads if g is not None)


def agreement(impl: str, device: torch.device, *, top_k: int, keep_ratio: float, liger_compiled: bool,
              tokens: int = 64, vocab: int = 1000, d_student: int = 32, d_teacher: int = 48,
              seed: int = 1) -> dict:
    """Loss and W_s-gradient of ``impl`` against ``taopd_kernels.reference`` (float64) at a small size.

    float32 inputs. TA-OPD implementations are checked against the reference's TA-OPD loss; liger
    against the reference with strategy="all" (full-token reverse KL), the loss it computes.
    """
    top_k = min(top_k, vocab)
    cfg = Config(tokens=tokens, d_student=d_student, d_teacher=d_teacher, vocab=vocab,
                 dtype=torch.float32, top_k=top_k, keep_ratio=keep_ratio, liger_compiled=liger_compiled)
    strategy = "all" if impl == "liger" else "teachability"
    inputs = make_inputs(cfg, device, seed=seed)
    h_s, w_s, h_t, w_t = inputs
    case = Case(impl, cfg, inputs, strategy=strategy)
    loss = case.forward()
    d_h, d_w = torch.autograd.grad(loss, [h_s, w_s])
    cpu = lambda x: x.detach().cpu()  # noqa: E731
    ref_h_s = cpu(h_s).requires_grad_(True)
    ref_w_s = cpu(w_s).requires_grad_(True)
    ref_loss, _ = reference_teachability_kl(ref_h_s, ref_w_s, cpu(h_t), cpu(w_t), top_k=top_k,
                                            keep_ratio=keep_ratio, strategy=strategy)
    ref_dw = torch.autograd.grad(ref_loss, [ref_w_s])[0]
    loss_v, ref_v = float(loss.detach()), float(ref_loss.detach())
    abs_err = abs(loss_v - ref_v)
    rel_err = abs_err / max(abs(ref_v), 1e-12)
    grad_err = float((cpu(d_w).double() - ref_dw.double()).norm() / ref_dw.double().norm().clamp_min(1e-30))
    # float32 on the CPU is accurate to ~1e-6; GPU kernels may use TF32 for float32 GEMMs.
    rtol, gtol = (1e-4, 1e-3) if device.type == "cpu" else (5e-3, 2e-2)
    ok = math.isfinite(loss_v) and (abs_err <= rtol * abs(ref_v) + 1e-6) and grad_err <= gtol
    return {"impl": impl, "strategy": strategy, "tokens": tokens, "vocab": vocab, "d_student": d_student,
            "d_teacher": d_teacher, "dtype": "float32", "loss": loss_v, "reference": ref_v,
            "abs_err": abs_err, "rel_err": rel_err, "grad_w_rel_err": grad_err, "rtol": rtol, "gtol": gtol,
            "ok": bool(ok)}
