"""taopd_kernels.hf on tiny Qwen3 (tied and untied lm_head), Llama, Cohere (logit scale) and Gemma 2
(softcapping, refused) models built locally from configs: no downloads."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from taopd_kernels import TeachabilityKLLoss, hf  # noqa: E402

V = 97


def _qwen3(tie, seed=0, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tie)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def _llama(seed=1, bias=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if bias:  # an lm_head with a bias, as some checkpoints have
        old = model.lm_head
        model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        model.lm_head.weight.data.copy_(old.weight.data)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("build", [lambda: _qwen3(True), lambda: _qwen3(False), lambda: _llama(),
                                   lambda: _llama(bias=True)], ids=["qwen3-tied", "qwen3-untied", "llama",
                                                                    "llama-bias"])
def test_head_inputs_reproduce_the_logits(build):
    model = build()
    ids, mask = _batch()
    s = hf.student_head_inputs(model, ids, mask)
    logits = model(input_ids=ids, attention_mask=mask).logits
    z = s.hidden @ s.weight.T + (0 if s.bias is None else s.bias)
    torch.testing.assert_close(z, logits, atol=1e-5, rtol=1e-5)
    assert s.hidden.requires_grad and s.hidden.shape == (2, 9, model.config.hidden_size)
    assert s.weight is model.get_output_embeddings().weight
    t = hf.teacher_head_inputs(model, ids, mask)
    assert not t.hidden.requires_grad and not t.weight.requires_grad and t.hidden.grad_fn is None
    torch.testing.assert_close(t.hidden, s.hidden.detach())


@pytest.mark.parametrize("tie", [True, False])
def test_loss_from_hf_models_gradient_reaches_student_only(tie):
    student, teacher = _qwen3(tie, seed=0), _llama(seed=3)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # the prompt
    s = hf.student_head_inputs(student, ids, mask)
    t = hf.teacher_head_inputs(teacher, ids, mask)
    loss, stats = TeachabilityKLLoss(keep_ratio=0.3, top_k=4, backend="torch")(
        s.hidden, s.weight, t.hidden, t.weight, labels, shift_labels=True, student_bias=s.bias, teacher_bias=t.bias, return_stats=True)
    loss.backward()
    assert torch.isfinite(loss) and stats.num_kept >= 2
    emb = student.get_input_embeddings().weight
    head = student.get_output_embeddings().weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert (emb is head) == tie  # tied: the input embedding is the lm_head and gets both gradients
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # through the backbone
    assert all(p.grad is None for p in teacher.parameters())


def test_logit_scale_is_folded_and_softcapping_is_refused():
    torch.manual_seed(0)
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, logit_scale=0.25)).eval()
    ids, mask = _batch()
    s = hf.student_head_inputs(cohere, ids, mask)
    assert s.logit_scale == 0.25
    torch.testing.assert_close(s.hidden @ s.weight.T, cohere(input_ids=ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-5)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0))
    assert hf.logit_transform(gemma) == (1.0, 30.0)
    with pytest.raises(hf.UnsupportedLogitTransform, match="final_logit_softcapping=30.0"):
        hf.student_head_inputs(gemma, ids, mask)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.lm_head_params(torch.nn.Linear(2, 2))
