"""A bank of contexts sampled once by the initial student theta_0 and frozen, the hidden states of a model
at its response positions, and the held-out KLs of a student on it (the comparison's ``KLBank``)."""

from __future__ import annotations

import dataclasses
import random
from typing import List

import torch

from taopd_kernels import teachability_stats
from taopd_kernels.hf import next_token_shift

from .. import head, run
from ..config import Config
from ..rollout import generate


@dataclasses.dataclass
class Bank:
    """Frozen contexts: prompt + theta_0's sampled response, with the positions that predict response tokens."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor  # [N, T-1]
    prompts: List[str]


@torch.no_grad()
def build_bank(cfg: Config, models, n: int, seed: int) -> Bank:
    rng = random.Random(seed)
    examples = [models.task.train_example(rng) for _ in range(n)]
    prompts = run.encode_prompts(cfg, models.tokenizer, examples)
    device = next(models.student.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ro = generate(models.student, prompts, max_new_tokens=cfg.rollout.max_new_tokens, eos_ids=models.tokenizer.eos_ids,
                  pad_id=models.tokenizer.pad_id, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                  generator=gen, vocab_limit=run.vocab_limit(cfg, models))
    valid, _ = head.loss_positions(ro.input_ids, ro.response_mask)
    return Bank(ro.input_ids, ro.attention_mask, ro.position_ids(), valid, [e.prompt for e in examples])


@torch.no_grad()
def hidden_rows(model, bank: Bank, chunk: int) -> torch.Tensor:
    """Final hidden states at the bank's valid positions, [P, D], in flat (row-major) order."""
    out = []
    for s in range(0, bank.input_ids.shape[0], chunk):
        h = head.final_hidden(model, bank.input_ids[s:s + chunk], bank.attention_mask[s:s + chunk],
                              bank.position_ids[s:s + chunk])
        out.append(next_token_shift(h)[0][bank.valid[s:s + chunk]].float())
    return torch.cat(out)


class KLBank:
    """Contexts sampled once by theta_0 (frozen), with the teacher's hidden states at their response positions."""

    def __init__(self, cfg: Config, models, n: int, seed: int):
        self.cfg, self.chunk = cfg, cfg.rollout.micro_batch_size
        self.bank = build_bank(cfg, models, n, seed)
        self.vocab = run.vocab_limit(cfg, models)
        self.h_t = hidden_rows(models.teacher, self.bank, self.chunk)
        self.w_t = head.lm_head_weight(models.teacher).detach().clone()
        self.n_positions = int(self.h_t.shape[0])

    @torch.no_grad()
    def kl(self, student) -> tuple:
        """(mean reverse KL, mean forward KL) of ``student`` against the teacher over the bank's positions."""
        was = student.training
        student.eval()
        h_s = hidden_rows(student, self.bank, self.chunk)
        st = teachability_stats(h_s, head.lm_head_weight(student).detach(), self.h_t, self.w_t, strategy=None,
                                top_k=self.cfg.loss.top_k, temperature=self.cfg.loss.temperature,
                                vocab_size=self.vocab, backend=self.cfg.loss.backend, check_finite=False)
        student.train(was)
        return float(st.kl_reverse.double().mean()), float(st.kl_forward.double().mean())
