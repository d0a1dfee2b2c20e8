"""Ahead-of-time compilation of the Triton kernels exactly as the JIT will compile them on a GPU, without one.

The real launchers (``launch_stats_forward``, ``kept_backward``) run on meta tensors of the shapes asked
for; the kernel call they make is captured instead of launched, so the arguments are the launcher's
own. Each argument is then specialised by Triton's own rule (``native_specialize_impl``: ints equal to
1 become constants, 16-divisible ints and 16-byte-aligned pointers get ``tt.divisibility = 16``), and
every shipped autotune config is compiled for the target (sm_90a or sm_80). ``ptxas -v`` (Triton's
bundled one) then reports registers, local-memory spills and shared memory; the PTX shows whether
the tensor cores are used (wgmma on sm_90a, mma.sync on sm_80).

    python -m taopd_kernels.backends.triton.aot            # a table for the Qwen-scale bf16 shapes

Needs triton (CPU is enough) and must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from ...options import DEFAULTS
from . import kept_backward as _backward
from . import stats_forward as _forward

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory a block may use (H100/H200, A100)
# SMs and L2 bytes of the reference GPUs (H100/H200 SXM, A100): the launchers' split choice reads them
# from the device, which meta tensors do not have, and the split count is a kernel argument.
GPU_SHAPE = {90: (132, 50 << 20), 80: (108, 40 << 20)}
MMA = {90: "wgmma", 80: "mma.sync"}


class _Captured(Exception):
    pass


@dataclass
class Compiled:
    kernel: str
    arch: int
    config: dict
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: bool

    def row(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return (f"{self.kernel:8s} sm_{self.arch}{'a' if self.arch == 90 else ' '} {cfg:58s} regs {self.registers:3d} "
                f"spill {self.spill_bytes:5d} B  smem {self.shared_bytes:6d} B  {MMA[self.arch] if self.tensor_cores else 'NO MMA'}")


def _capture(launch: Callable[[], None], module, arch: int, want: Callable[[dict], bool] = lambda kwargs: True):
    """Run a launcher with its tuned kernel replaced by a recorder; returns (args, kwargs, configs) of the
    first launch whose keyword arguments ``want`` accepts (the launches before it do nothing)."""
    seen = {}

    class _Recorder:
        def __init__(self, configs):
            self.configs = configs

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                if want(kwargs):
                    seen.update(args=args, kwargs=kwargs, configs=self.configs)
                    raise _Captured()
            return call

    hopper = arch >= 90
    sms, l2 = GPU_SHAPE[arch]
    fakes = dict(_tuned_kernel=lambda device, nbytes: _Recorder(module._configs(hopper, nbytes)),
                 is_hopper=lambda device: hopper, sm_count=lambda device: sms, l2_bytes=lambda device: l2)
    originals = {name: getattr(module, name) for name in fakes if hasattr(module, name)}
    for name in originals:
        setattr(module, name, fakes[name])
    try:
        launch()
    except _Captured:
        pass
    finally:
        for name, value in originals.items():
            setattr(module, name, value)
    if not seen:
        raise RuntimeError("the launcher made no kernel call")
    return seen["args"], seen["kwargs"], seen["configs"]


def _ptxas_candidates() -> list:
    """Triton's bundled ptxas ones first, then the system's: the PTX version Triton emits may need a newer
    ptxas than the bundled one (Triton picks the newest it finds for its own compile)."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = sorted(n for n in os.listdir(bundled) if n.startswith("ptxas")) if os.path.isdir(bundled) else []
    found = [os.path.join(bundled, n) for n in names] + [shutil.which("ptxas") or ""]
    return [p for p in found if p and os.access(p, os.X_OK)]


def _ptxas(ptx: str, arch: int) -> tuple:
    name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates():
            res = subprocess.run([ptxas, "-v", f"--gpu-name={name}", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
            errors.append(f"{ptxas}: {res.stderr.strip()[-300:]}")
        else:
            raise RuntimeError(f"no ptxas could assemble the PTX for {name}: " + "; ".join(errors))
        out = res.stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def compile_as_jit(fn, args, kwargs, config, arch: int, name: str) -> Compiled:
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, arg_name in enumerate(names):
        value = values[arg_name]
        if fn.params[i].is_constexpr:
            signature[arg_name] = "constexpr"
            constexprs[(i,)] = value
            continue
        kind, attr = triton._C.libtriton.native_specialize_impl(BaseBackend, value, False, True, True)
        signature[arg_name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = kernel.asm["ptx"]
    regs, spills = _ptxas(ptx, arch)
    return Compiled(name, arch, {**config.kwargs, "warps": config.num_warps, "stages": config.num_stages},
                    regs, spills, kernel.metadata.shared, MMA[arch] in ptx)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def compile_shipped(arch: int, *, rows: int = 8192, d_s: int = 2048, d_t: int = 4096, vocab: int = 151_936,
                    top_k: int = DEFAULTS.top_k, dtype=torch.bfloat16, kernels=("forward", "backward_full", "backward_sampled"),
                    configs: Optional[slice] = None) -> List[Compiled]:
    """Every shipped config of the chosen kernels, compiled for ``arch`` with the JIT's specialisation."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    h_s, w_s, h_t, w_t = _meta(rows, d_s, dtype=dtype), _meta(vocab, d_s, dtype=dtype), \
        _meta(rows, d_t, dtype=dtype), _meta(vocab, d_t, dtype=dtype)
    y = torch.empty(rows, dtype=torch.long, device="meta")
    out = []
    jobs = []
    if "forward" in kernels:
        jobs.append(("forward", _forward, _forward._stats_forward_kernel, lambda: _forward.launch_stats_forward(
            h_s, w_s, None, h_t, w_t, None, vocab_size=vocab, top_k=top_k, temperature=1.0, sampled_ids=y),
            lambda kwargs: True))
    kept = max(1, rows // 20)
    for estimator in ("full", "sampled"):
        if f"backward_{estimator}" not in kernels:
            continue
        f32 = torch.empty(kept, dtype=torch.float32, device="meta")
        # the kept backward's two passes: the softmax (SOFTMAX=True) and the gradient, each compiled
        for softmax in (True, False):
            jobs.append((f"bwd_{estimator}{'_sm' if softmax else ''}", _backward, _backward._kept_backward_kernel,
                         lambda e=estimator, f=f32: _backward.kept_backward(
                             h_s[:kept], w_s, None, h_t[:kept], w_t, None, vocab_size=vocab, temperature=1.0,
                             estimator=e, row_coef=f, sampled_ids=y[:kept], sampled_weight=f),
                         lambda kwargs, sm=softmax: kwargs.get("SOFTMAX", False) == sm))
    for name, module, fn, launch, want in jobs:
        args, kwargs, shipped = _capture(launch, module, arch, want)
        for config in shipped[configs or slice(None)]:
            out.append(compile_as_jit(fn, args, kwargs, config, arch, name))
    return out


if __name__ == "__main__":
    for arch in (90, 80):
        for c in compile_shipped(arch):
            print(c.row())
