"""Vocabulary checks at the start of a run: the vocabulary the loss and the rollouts use, ``loss.vocab_size``
and ``loss.top_k`` in range (ConfigErrors naming the key), and the two models' tokenizers compared."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from taopd_kernels import default_vocab_size

from . import checkpoint, head
from .config import Config, ConfigError
from .models import declared_vocab_size

if TYPE_CHECKING:
    from .run import Models


def check_vocab_config(cfg: Config, tokenizer) -> None:
    """Before any model is loaded or prepared: ``loss.vocab_size`` / ``loss.top_k`` against the
    vocabulary sizes the model configs declare, and the tokenizer against both embeddings."""
    sizes = {role: declared_vocab_size(getattr(cfg, role)) for role in ("student", "teacher")}
    _check_vocab(cfg, tokenizer, sizes, sizes, log=None)


def check_vocab(cfg: Config, models: Models, log=print) -> int:
    """On the loaded models: the vocabulary the loss and the rollouts use (logged, with what is sliced
    from which head); ``loss.vocab_size`` and ``loss.top_k`` in range; the student's tokenizer readable
    by both models. Returns the vocabulary size used. Errors are ConfigErrors naming the config key."""
    heads = {"student": head.lm_head_weight(models.student).shape[0],
             "teacher": head.lm_head_weight(models.teacher).shape[0]}
    embeddings = {"student": models.student.get_input_embeddings().weight.shape[0],
                  "teacher": models.teacher.get_input_embeddings().weight.shape[0]}
    return _check_vocab(cfg, models.tokenizer, heads, embeddings, log)


def _model_key(cfg: Config, role: str) -> str:
    m = getattr(cfg, role)
    return f"{role}.config_file={m.config_file!r}" if m.random_init and m.config_file else f"{role}.path={m.path!r}"


def _check_vocab(cfg, tokenizer, heads: dict, embeddings: dict, log) -> Optional[int]:
    lo = cfg.loss
    n_tok = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    for role in ("teacher", "student"):
        rows = embeddings.get(role)
        if rows and n_tok and n_tok > rows:
            raise ConfigError(
                f"{_model_key(cfg, role)}: its embedding has {rows:,} rows, but the student's tokenizer has "
                f"{n_tok:,} tokens (ids up to {n_tok - 1:,}): the {role} cannot read the student's tokens. On-policy "
                f"distillation here needs one vocabulary: use a {role} with the student's tokenizer")
    if not (heads.get("student") and heads.get("teacher")):
        if lo.vocab_size and any(h and lo.vocab_size > h for h in heads.values()):
            role, h = next((r, h) for r, h in heads.items() if h and lo.vocab_size > h)
            raise ConfigError(f"loss.vocab_size={lo.vocab_size}: larger than the {role}'s lm_head ({h:,} rows)")
        return None
    smaller = default_vocab_size(heads["student"], heads["teacher"])
    if lo.vocab_size is not None and lo.vocab_size > smaller:
        raise ConfigError(f"loss.vocab_size={lo.vocab_size}: must be <= {smaller:,}, the smaller lm_head (student "
                          f"{heads['student']:,} rows, teacher {heads['teacher']:,} rows); null uses {smaller:,}")
    v = lo.vocab_size or smaller
    if lo.top_k > v:
        raise ConfigError(f"loss.top_k={lo.top_k}: must be <= the vocabulary the loss uses ({v:,} ids; loss.vocab_size)")
    eos = [e for e in (getattr(tokenizer, "eos_ids", None) or []) if e >= v]
    if eos:
        raise ConfigError(f"loss.vocab_size={v}: the EOS id {eos[0]:,} is not among the first {v:,} ids, so no "
                          "rollout could end; use a larger loss.vocab_size (or null)")
    if log is not None:
        how = "loss.vocab_size" if lo.vocab_size else "the smaller lm_head"
        msg = (f"[vocab] tokenizer {n_tok:,} tokens; lm_head rows: student {heads['student']:,}, teacher "
               f"{heads['teacher']:,}; the loss and the rollouts use ids 0..{v - 1:,} ({v:,}, {how})")
        for role in ("student", "teacher"):
            if heads[role] > v:
                msg += f"; {role} lm_head rows {v:,}..{heads[role] - 1:,} ({heads[role] - v:,}) are sliced off"
        log(msg)
    return v


def _vocab_of(tokenizer) -> Optional[Dict[str, int]]:
    """token string -> id of an HF tokenizer or the driver's tokenizer wrappers (byte-level strings)."""
    hf = getattr(tokenizer, "_tok", tokenizer)
    if hasattr(hf, "get_vocab"):
        return hf.get_vocab()
    if type(tokenizer).__name__ == "QwenBPETokenizer":
        return checkpoint.builtin_hf_tokenizer(tokenizer).get_vocab()
    return None


def compare_tokenizers(student_tok, teacher_tok) -> str:
    """Raise ConfigError unless both tokenizers give the same id to every token they share (and share
    most of their vocabulary); return a line that says what was compared."""
    s, t = _vocab_of(student_tok), _vocab_of(teacher_tok)
    if s is None or t is None:
        return "[vocab] tokenizers not compared (no vocabulary to read)"
    shared = s.keys() & t.keys()
    differ = sorted((tok for tok in shared if s[tok] != t[tok]), key=lambda x: s[x])
    by_id_t = {i: tok for tok, i in t.items()}
    if differ or len(shared) < 0.9 * min(len(s), len(t)):
        examples = "; ".join(f"{tok!r}: student id {s[tok]}, teacher id {t[tok]}" for tok in differ[:3])
        only = sorted((i, tok) for tok, i in s.items() if tok not in t)[:3]
        only_txt = "; ".join(f"student id {i} {tok!r} is teacher id {i} {by_id_t.get(i)!r}" for i, tok in only)
        raise ConfigError(
            f"teacher.path: the student's and the teacher's tokenizers differ: {len(differ):,} of the {len(shared):,} "
            f"tokens they share have different ids{' (' + examples + ')' if examples else ''}; "
            f"{len(s) - len(shared):,} student tokens are not in the teacher's vocabulary"
            f"{' (' + only_txt + ')' if only_txt else ''}; vocabulary sizes: student {len(s):,}, teacher {len(t):,}. "
            "The loss compares the two models' distributions id by id, so they must share one tokenizer")
    extra = f" (student {len(s):,} tokens, teacher {len(t):,})" if len(s) != len(t) else ""
    return f"[vocab] student and teacher tokenizers agree: the same ids for all {len(shared):,} shared tokens{extra}"


def teacher_tokenizer(cfg: Config):
    """The teacher's own tokenizer, if it has one (a local HF folder with tokenizer files); else None."""
    m = cfg.teacher
    if m.path == "builtin" or (m.random_init and not Path(m.path).expanduser().is_dir()):
        return None
    from .models import _local_or_raise

    path = Path(_local_or_raise(m.path, "teacher"))
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                              "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
