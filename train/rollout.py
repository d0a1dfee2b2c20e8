"""Rollouts: batched generation with a KV cache (rollouts and evaluation) and the optional vLLM engine.

``generate``: prompts are left-padded; every sequence stops at its first EOS or after
``max_new_tokens``. Sampling draws from ``softmax(logits / temperature)`` over the first
``vocab_limit`` columns (the columns the loss head uses), with an explicit ``torch.Generator`` so a
step's rollout is reproducible. ``make_rollout_engine("vllm", ...)``: one colocated vLLM engine per
rank; its token lists become a ``Rollout`` through ``rollout_from_tokens``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class Rollout:
    """``input_ids``/``attention_mask``: [B, T] (prompt left-padded, response right-padded after EOS);
    ``response_mask``: [B, T], 1 on generated tokens up to and including EOS; ``prompt_len``: P (the
    padded prompt width: responses start at column P)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    # [B] bool: the sequence met a non-finite logit (NaN/+inf, or no finite one) while generating; it was
    # ended there with EOS. None: not tracked (e.g. vLLM). A NaN model never passes for a working one.
    nonfinite: Optional[torch.Tensor] = None

    @property
    def response_ids(self) -> List[List[int]]:
        out = []
        for ids, m in zip(self.input_ids[:, self.prompt_len:].tolist(), self.response_mask[:, self.prompt_len:].tolist()):
            out.append([t for t, k in zip(ids, m) if k])
        return out

    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # renamed in recent transformers


def unusable_rows(row_max: torch.Tensor) -> torch.Tensor:
    """Rows whose logits cannot be sampled from, from their maxima alone: a NaN anywhere (max propagates
    NaN), a +inf, or no finite value (every entry -inf). One pass over [B, V] for the max instead of three
    for isnan / isposinf / isfinite, which cost more than the model's forward on a 152k vocabulary."""
    return ~torch.isfinite(row_max)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        choice = torch.multinomial(sp, 1, generator=generator)
        return si.gather(-1, choice).squeeze(-1)
    # inverse-CDF sampling: exact, and much faster than torch.multinomial over 151,936 columns on CPU
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, vocab_limit: Optional[int] = None,
             all_done: Optional[Callable[[torch.Tensor], bool]] = None) -> Rollout:
    """``all_done(done)``: when to stop (default: every local sequence is done). A sharded model passes
    ``parallel.all_ranks_done``: every forward is collective, so all ranks step until all are done."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    batch, width = ids.shape
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    was_training = model.training
    model.eval()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
    pos = position_ids_from_mask(mask)
    step_ids, step_pos, full_mask = ids, pos, mask
    new_tokens, new_mask = [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        # NaN probabilities would "sample" the last id: flag the row and end it with EOS instead
        row_max, greedy_tok = logits.max(-1)
        bad = unusable_rows(row_max) & ~done
        nonfinite |= bad
        tok = greedy_tok if greedy else _sample(torch.where(bad[:, None], 0.0, logits.float()), temperature,
                                                top_p, generator)
        tok = torch.where(bad, eos[0], tok)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new_tokens.append(tok)
        new_mask.append((~done).long())
        done = done | torch.isin(tok, eos)
        if all_done(done) if all_done is not None else bool(done.all()):
            break
        step_ids = tok[:, None]
        step_pos = step_pos[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
    if was_training:
        model.train()
    resp = torch.stack(new_tokens, 1)
    resp_mask = torch.stack(new_mask, 1)
    input_ids = torch.cat([ids, resp], 1)
    attention_mask = torch.cat([mask, resp_mask], 1)
    response_mask = torch.cat([torch.zeros_like(mask), resp_mask], 1)
    return Rollout(input_ids, attention_mask, response_mask, width, nonfinite)


def rollout_from_tokens(prompts, responses, pad_id: int, eos_ids, device) -> Rollout:
    """A ``Rollout`` from token lists (vLLM's output): prompts left-padded, responses right-padded,
    each response cut after its first EOS."""
    ids, mask = left_pad(prompts, pad_id, device)
    eos = set(eos_ids)
    cut = []
    for r in responses:
        end = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        cut.append(list(r[:end]))
    width = max(1, max(len(r) for r in cut))
    resp = torch.full((len(cut), width), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(cut), width), dtype=torch.long)
    for i, r in enumerate(cut):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[i, :len(r)] = 1
    resp, rmask = resp.to(device), rmask.to(device)
    return Rollout(torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1),
                   torch.cat([torch.zeros_like(mask), rmask], 1), ids.shape[1])


# --------------------------------------------------------------------------------------------------
# vLLM (optional)


class VLLMRollout:
    """Optional vLLM rollouts: one colocated engine per rank (tensor parallel 1) on this rank's GPU.

    ``generate`` takes prompt token ids; ``sync_weights`` pushes the current student weights into the
    engine (call after each optimizer step, on every rank: it all-gathers the shards layer by layer).
    """

    def __init__(self, model_path: str, *, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", max_model_len: Optional[int] = None, **engine_kwargs):
        vllm = import_vllm()
        # In-process engine (so its model object is reachable for the weight sync) that reuses the
        # torchrun environment instead of starting its own workers (the colocated set-up TRL uses).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = dict(model=model_path, tensor_parallel_size=1, seed=seed, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False)
        if dist.is_available() and dist.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs)
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None) -> list[list[int]]:
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           seed=seed)
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def _loader(self):
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.worker.model_runner.model",
                     "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model"):
            obj = engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return obj.load_weights
            except AttributeError:
                continue
        return None

    def sync_weights(self, model: torch.nn.Module) -> None:
        def weights():
            for name, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                yield name, full.detach()

        load = self._loader()
        if load is None:
            raise RuntimeError("cannot reach the vLLM engine's model to load weights into (this vLLM version "
                               "keeps it elsewhere); use rollout engine 'hf' or a vLLM version whose in-process "
                               "engine exposes llm_engine.model_executor.driver_worker.worker.model_runner.model")
        load(weights())


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "rollouts are configured to use vLLM (rollout engine 'vllm'), but the vllm package is not "
            "installed in this environment: `pip install vllm`, or set the rollout engine to 'hf' "
            "(transformers generate)") from e
    return vllm


def make_rollout_engine(engine: str, model_path: Optional[str] = None, **kwargs):
    """None for "hf" (``generate`` on the training student); a ``VLLMRollout`` for "vllm"."""
    if engine in (None, "hf"):
        return None
    if engine != "vllm":
        raise ValueError(f"rollout engine must be 'hf' or 'vllm', got {engine!r}")
    import_vllm()  # the clear error first, before anything else is checked
    if not model_path:
        raise ValueError("rollout engine 'vllm' needs the student's model path (a HF checkpoint directory)")
    return VLLMRollout(model_path, **kwargs)
