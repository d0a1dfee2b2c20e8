"""TA-OPD with TRL: distil a teacher into a student on the student's own completions, training only on
the teachable positions (taopd_kernels.integrations.trl.TAOPDTrainer).

    # real models (downloads from the hub):
    python examples/trl_ta_opd.py --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-4B --keep-ratio 0.05
    # a self-contained smoke run on tiny random models (no downloads, CPU, seconds):
    python examples/trl_ta_opd.py --tiny
    # the smoke test (tests/test_scripts_smoke.py): --tiny, one step, outputs in a temporary folder
    python examples/trl_ta_opd.py --smoke
    # the same optimizer step without accumulation: one micro-batch of 4 instead of 2 x 2
    python examples/trl_ta_opd.py --tiny --batch-size 4 --grad-accum 1

Gradient accumulation: one selection over the generation batch (--batch-size x --grad-accum prompts per
process), each micro-batch's loss divided by that batch's kept count, so the accumulated gradient and the
logged loss are those of the one-batch mean over kept positions (tests/test_trl_grad_accum.py).
"""

import argparse
import tempfile

import datasets
import torch
import transformers

from taopd_kernels.integrations.trl import TAOPDConfig, TAOPDTrainer

WORDS = [f"w{i}" for i in range(40)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>", padding_side="left")
    return out


def tiny_models(vocab):
    torch.manual_seed(0)
    student = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1))
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1))
    return student, teacher


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student"), p.add_argument("--teacher")
    p.add_argument("--tiny", action="store_true", help="tiny random Qwen3 student / Llama teacher, local tokenizer")
    p.add_argument("--dataset", default="trl-lib/DeepMath-103K", help="a dataset with a 'prompt' column")
    p.add_argument("--strategy", default="teachability"), p.add_argument("--keep-ratio", type=float, default=0.05)
    p.add_argument("--top-k", type=int, default=16), p.add_argument("--estimator", default="full")
    p.add_argument("--max-steps", type=int, default=2), p.add_argument("--output-dir", default="ta_opd_out")
    p.add_argument("--batch-size", type=int, help="per-device micro-batch (default: 2 with --tiny, else 4)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: 2 with --tiny, else 4)")
    p.add_argument("--smoke", action="store_true", help="a CPU smoke run: --tiny, one step, a temporary folder")
    a = p.parse_args(argv)
    if a.smoke:
        a.tiny, a.max_steps, a.output_dir = True, 1, tempfile.mkdtemp(prefix="trl_ta_opd-smoke-")
    default_size = 2 if a.tiny else 4  # of the micro-batch and of the accumulation
    common = dict(output_dir=a.output_dir, max_steps=a.max_steps, logging_steps=1, report_to="none",
                  per_device_train_batch_size=default_size if a.batch_size is None else a.batch_size,
                  gradient_accumulation_steps=default_size if a.grad_accum is None else a.grad_accum,
                  taopd_strategy=a.strategy, taopd_keep_ratio=a.keep_ratio, taopd_top_k=a.top_k,
                  taopd_estimator=a.estimator, save_strategy="no")
    if a.tiny:
        common["taopd_top_k"] = min(a.top_k, 4)  # the tiny vocabulary has 43 tokens
        tok = tiny_tokenizer()
        student, teacher = tiny_models(len(tok))
        train = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(16)]})
        args = TAOPDConfig(**common, max_completion_length=6, use_cpu=True, bf16=False)
        trainer = TAOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                               processing_class=tok)
    else:
        if not (a.student and a.teacher):
            p.error("give --student and --teacher, or --tiny")
        train = datasets.load_dataset(a.dataset, split="train")
        args = TAOPDConfig(**common, max_completion_length=1024, bf16=torch.cuda.is_available())
        trainer = TAOPDTrainer(model=a.student, teacher_model=a.teacher, args=args, train_dataset=train)
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                   if k in ("loss", "grad_norm") or k.startswith("taopd/")})


if __name__ == "__main__":
    main()
