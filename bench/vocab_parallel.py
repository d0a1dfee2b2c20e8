"""The vocabulary-parallel loss head on the CPU with gloo: time, peak memory per rank and bytes on the network
per position, for tp in {1, 2, 4} on the same problem (docs/distributed.md, Vocabulary-parallel lm_head).

    python bench/vocab_parallel.py            # writes bench/results/vocab_parallel_cpu.{json,md}
    python bench/vocab_parallel.py --smoke    # tiny shapes, tp in {1, 2}, results in a temporary folder

Each tp runs in ``tp`` fresh processes (``mp.spawn``, gloo, one torch thread each). Every rank builds only
its own rows of both lm_heads (row blocks seeded by block index, so every tp sees the same heads) and the
same hidden states, then runs ``fused_teachability_kl(..., vocab_parallel=VocabParallel())`` forward and
backward ``--repeats`` times. Measured per rank:
- time: wall seconds of one forward + backward (the median over repeats; the slowest rank is reported);
- memory: peak RSS (``ru_maxrss``) after the calls, and the RSS before the first call (inputs built);
- bytes: every ``torch.distributed`` collective the call makes is wrapped and counted (this rank's payload:
  the tensor it contributes to an all_gather, the tensor of an all_reduce), split into forward (statistics,
  selection, loss) and backward. Bytes sent per rank: all_gather payload x (tp - 1) (its piece reaches every
  other rank), all_reduce 2 (tp - 1) / tp x size (a ring); received is the same for these collectives.
The loss of every tp is recorded too: it must equal tp = 1's within float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

from _meta import add_smoke_option, metadata, smoke_dir

HERE = Path(__file__).resolve().parent

DEFAULTS = dict(positions=2048, d_student=512, d_teacher=768, vocab=32768, top_k=16, keep_ratio=0.05, repeats=3,
                tp=[1, 2, 4])
SMOKE = dict(positions=64, d_student=32, d_teacher=48, vocab=1000, top_k=8, keep_ratio=0.1, repeats=1, tp=[1, 2])
BLOCK = 1024  # rows per seeded block of a head


def _head_rows(lo: int, hi: int, d: int, seed: int):
    """Rows [lo, hi) of a [V, d] head whose block b of BLOCK rows is drawn from seed (seed, b): any split of
    the rows gives the same head, and a rank never builds rows it does not hold."""
    import torch

    parts = []
    for b in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK if hi > lo else lo // BLOCK):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        block = torch.randn(BLOCK, d, generator=g) * (3.0 / d ** 0.5)
        start = b * BLOCK
        parts.append(block[max(lo, start) - start:min(hi, start + BLOCK) - start])
    return torch.cat(parts) if parts else torch.zeros(0, d)


class Traffic:
    """Wraps torch.distributed.all_gather and all_reduce and counts this rank's payload bytes per phase."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.phase = dist, "forward"
        self.bytes = {"forward": {"all_gather": 0, "all_reduce": 0}, "backward": {"all_gather": 0, "all_reduce": 0}}
        self.calls = {"forward": 0, "backward": 0}
        gather, reduce = dist.all_gather, dist.all_reduce

        def all_gather(out, tensor, *args, **kwargs):
            self.bytes[self.phase]["all_gather"] += tensor.numel() * tensor.element_size()
            self.calls[self.phase] += 1
            return gather(out, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.bytes[self.phase]["all_reduce"] += tensor.numel() * tensor.element_size()
            self.calls[self.phase] += 1
            return reduce(tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce

    def sent(self, phase: str, world: int) -> float:
        """Bytes this rank puts on the network in ``phase`` (all_gather: to every other rank; all_reduce: ring)."""
        b = self.bytes[phase]
        return b["all_gather"] * (world - 1) + b["all_reduce"] * 2 * (world - 1) / world


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _worker(rank: int, world: int, init: str, cfg: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    traffic = Traffic()
    from taopd_kernels import fused_teachability_kl
    from taopd_kernels.vocab_parallel import VocabParallel

    try:
        v, n = cfg["vocab"], cfg["positions"]
        per = -(-v // world)
        lo, hi = min(rank * per, v), min((rank + 1) * per, v)
        g = torch.Generator().manual_seed(7)
        h_s = torch.randn(n, cfg["d_student"], generator=g)
        h_t = torch.randn(n, cfg["d_teacher"], generator=g)
        w_s = _head_rows(lo, hi, cfg["d_student"], 1).requires_grad_(True)
        w_t = _head_rows(lo, hi, cfg["d_teacher"], 2)
        h_s.requires_grad_(True)
        rss_before = _current_rss_mb()
        times, kept = [], 0
        for _ in range(cfg["repeats"]):
            dist.barrier()
            traffic.phase = "forward"
            start = time.perf_counter()
            loss, stats = fused_teachability_kl(h_s, w_s, h_t, w_t, top_k=cfg["top_k"], keep_ratio=cfg["keep_ratio"],
                                                backend="torch", vocab_parallel=VocabParallel())
            traffic.phase = "backward"
            loss.backward()
            times.append(time.perf_counter() - start)
            kept = stats.num_kept
        repeats = cfg["repeats"]
        result = {
            "rank": rank, "rows": hi - lo, "seconds": statistics.median(times), "loss": loss.item(),
            "num_kept": kept, "rss_before_call_mb": rss_before, "rss_peak_mb": _rss_mb(),
            "payload_bytes": {p: {k: b / repeats for k, b in d.items()} for p, d in traffic.bytes.items()},
            "collectives_per_call": {p: c / repeats for p, c in traffic.calls.items()},
            "sent_bytes": {p: traffic.sent(p, world) / repeats for p in ("forward", "backward")},
        }
        with open(f"{out_dir}/tp{world}_rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_tp(world: int, cfg: dict, out_dir: Path) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, f"tcp://127.0.0.1:{port}", cfg, str(out_dir)), nprocs=world)
    ranks = [json.loads((out_dir / f"tp{world}_rank{r}.json").read_text()) for r in range(world)]
    n, kept = cfg["positions"], ranks[0]["num_kept"]
    fwd = max(r["sent_bytes"]["forward"] for r in ranks)
    bwd = max(r["sent_bytes"]["backward"] for r in ranks)
    return {
        "tp": world, "ranks": ranks, "seconds": max(r["seconds"] for r in ranks), "loss": ranks[0]["loss"],
        "rss_peak_mb_max": max(r["rss_peak_mb"] for r in ranks),
        "rss_before_call_mb_max": max(r["rss_before_call_mb"] for r in ranks),
        "forward_payload_bytes_per_position": sum(ranks[0]["payload_bytes"]["forward"].values()) / n,
        "forward_sent_bytes_per_position": fwd / n,
        "backward_payload_bytes_per_kept_position": sum(ranks[0]["payload_bytes"]["backward"].values()) / max(kept, 1),
        "backward_sent_bytes_per_kept_position": bwd / max(kept, 1),
        "num_kept": kept,
    }


def predicted(cfg: dict) -> dict:
    """The stated budget (taopd_kernels/vocab_parallel.py): payload bytes per position (forward) and per kept
    position (backward, dh reduced over the group)."""
    k = cfg["top_k"]
    return {"forward_payload_bytes_per_position": 4 * (7 + 6 * k),
            "backward_payload_bytes_per_kept_position": 12 + 4 * cfg["d_student"]}


def write_markdown(result: dict, path: Path) -> None:
    cfg, pred = result["config"], result["predicted"]
    lines = [
        "# Vocabulary-parallel loss head on the CPU (gloo)",
        "",
        f"`python bench/vocab_parallel.py` on {result['device']}, torch {result['torch']}, commit {result['commit']}, "
        f"{result['date']}. One torch thread per rank ({os.cpu_count()} cores: tp = 4 shares them).",
        "",
        f"Problem: {cfg['positions']} positions, V = {cfg['vocab']}, D_s = {cfg['d_student']}, "
        f"D_t = {cfg['d_teacher']}, K = {cfg['top_k']}, keep_ratio {cfg['keep_ratio']}, float32; "
        "forward (statistics, selection, loss) + kept-row backward, dh reduced over the group.",
        "",
        "| tp | s / step (slowest rank) | peak RSS / rank (MB) | RSS before call (MB) | fwd payload B/pos | "
        "fwd sent B/pos | bwd payload B/kept pos | bwd sent B/kept pos | loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["runs"]:
        lines.append(f"| {row['tp']} | {row['seconds']:.3f} | {row['rss_peak_mb_max']:.0f} | "
                     f"{row['rss_before_call_mb_max']:.0f} | {row['forward_payload_bytes_per_position']:.1f} | "
                     f"{row['forward_sent_bytes_per_position']:.1f} | "
                     f"{row['backward_payload_bytes_per_kept_position']:.1f} | "
                     f"{row['backward_sent_bytes_per_kept_position']:.1f} | {row['loss']:.6f} |")
    lines += [
        "",
        f"Stated budget (payload per rank): forward 4 (7 + 6K) = {pred['forward_payload_bytes_per_position']} B per "
        f"position (7 float32 scalars, 2K int64 keys, 2K float32 logits) plus 16 B per call (the shard layout); "
        f"backward 12 + 4 D_s = {pred['backward_payload_bytes_per_kept_position']} B per kept position (max, S0, Q "
        "and the kept row of dh). Sent = payload x (tp - 1) for the all_gathers, 2 (tp - 1) / tp x size for the "
        "dh all_reduce (ring). No logits row crosses the network: a float32 row would be 4 V = "
        f"{4 * cfg['vocab']} B per position.",
        "",
        "At tp = 1 the group has one rank: the all_gathers reach nobody and the dh all_reduce is skipped. The "
        "loss column is the same float32 value at every tp (the statistics are merged exactly; see "
        "tests/test_vocab_parallel.py for the tolerances).",
        "",
        "Peak RSS includes the interpreter, torch and this rank's inputs (hidden states of every position, its "
        "rows of both heads); the loss head's own working set is the difference to the RSS before the call.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    for key in ("positions", "d_student", "d_teacher", "vocab", "top_k", "repeats"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--tp", type=int, nargs="+", default=None)
    add_smoke_option(p)
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else DEFAULTS)
    for key in list(cfg):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.smoke and args.out.resolve() == (HERE / "results").resolve():
        args.out = smoke_dir("vocab_parallel")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="vocab_parallel_ranks-"))
    runs = []
    for world in cfg["tp"]:
        runs.append(run_tp(world, cfg, scratch))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "ranks"}), flush=True)
    base = runs[0]["loss"]
    for row in runs[1:]:
        if abs(row["loss"] - base) > 1e-4 * (1 + abs(base)):
            raise SystemExit(f"tp={row['tp']} loss {row['loss']} differs from tp={runs[0]['tp']}'s {base}")
    result = {**metadata("cpu"), "config": cfg, "predicted": predicted(cfg), "runs": runs}
    stem = args.out / "vocab_parallel_cpu"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, stem.with_suffix(".md"))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
