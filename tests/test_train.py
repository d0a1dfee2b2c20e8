"""Tests of the OPD driver (train/run.py, installed as taopd_train): config, one step's gradients, resume, and the default run's gain.

Everything runs on CPU with tiny Qwen3-architecture models that keep the full 151,936-row vocabulary.
"""

import json
import math

import pytest
import torch

from taopd_train import head, run
from taopd_train.config import CONFIG_DIR, ConfigError, load_config
from taopd_train.models import QWEN3_VOCAB, load_model


# ------------------------------------------------------------------ config


def test_defaults_overrides_and_bundled_config():
    cfg = load_config(None, ["loss.strategy=entropy", "optim.betas=[0.9,0.95]", "teacher.tiny.hidden_size=96",
                             "loss.vocab_size=null", "eval.every=5"])
    assert cfg.loss.strategy == "entropy" and cfg.optim.betas == (0.9, 0.95)
    assert cfg.teacher.tiny.hidden_size == 96 and cfg.teacher.tiny.num_layers == 3  # teacher keeps its defaults
    assert cfg.loss.vocab_size is None and cfg.eval.every == 5
    q = load_config("qwen3")  # bundled name
    assert q.student.path == "Qwen/Qwen3-1.7B" and q.teacher.path == "Qwen/Qwen3-4B"
    assert q.loss.keep_ratio == 0.10 and q.loss.top_k == 16 and q.optim.lr == 1e-6
    assert q.optim.betas == (0.9, 0.98) and q.optim.weight_decay == 0.1 and q.precision == "bf16-mixed"
    assert q.student.dtype == "float32" and q.teacher.dtype == "bfloat16"  # fp32 master weights, bf16 teacher
    assert load_config(str(CONFIG_DIR / "qwen3.yaml")) == q  # path


@pytest.mark.parametrize("override, key", [
    ("loss.bogus=1", "loss.bogus"),
    ("bogus=1", "bogus"),
    ("student.tiny.width=3", "student.tiny.width"),
    ("loss.keep_ratio=1.5", "loss.keep_ratio"),
    ("loss.strategy=greedy", "loss.strategy"),
    ("loss.estimator=exact", "loss.estimator"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("rollout.batch_size=0", "rollout.batch_size"),
    ("student.dtype=int8", "student.dtype"),
    ("eval.at_start=maybe", "eval.at_start"),
    ("seed=1.5", "seed"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_main_reports_config_errors(capsys):
    assert run.main(["loss.nope=3"]) == 2
    assert "loss.nope" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="bundled"):
        load_config("no-such-config")


def test_missing_model_fails_at_once_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    cfg = load_config("qwen3")
    with pytest.raises(FileNotFoundError) as err:
        load_model(cfg.student, "student", torch.device("cpu"))
    msg = str(err.value)
    assert "Qwen/Qwen3-1.7B" in msg and "student.path=" in msg


def test_bundled_architectures_build_with_random_weights():
    cfg = load_config("qwen3", ["student.random_init=true", "teacher.random_init=true"])
    with torch.device("meta"):
        s = load_model(cfg.student, "student", torch.device("meta"))
        t = load_model(cfg.teacher, "teacher", torch.device("meta"))
    n_s = sum(p.numel() for p in s.parameters())
    n_t = sum(p.numel() for p in t.parameters())
    assert 1.6e9 < n_s < 1.8e9 and 3.9e9 < n_t < 4.1e9  # Qwen3-1.7B / Qwen3-4B (tied embeddings)
    assert s.get_output_embeddings().weight.shape == (QWEN3_VOCAB, 2048)
    assert s.get_output_embeddings().weight is s.get_input_embeddings().weight


# ------------------------------------------------------------------ tiny random models (full vocabulary)


def _tiny_config_files(tmp_path):
    from taopd_train.config import TinyArch
    from taopd_train.models import tiny_qwen3_config

    paths = {}
    for role, arch in (("student", TinyArch(32, 1, 2, 1, 64)), ("teacher", TinyArch(48, 1, 2, 1, 96))):
        d = tmp_path / f"{role}_arch"
        tiny_qwen3_config(arch).save_pretrained(d)
        paths[role] = str(d / "config.json")
    return paths


def _tiny_cfg(tmp_path, *extra):
    files = _tiny_config_files(tmp_path)
    return load_config(None, [
        "student.random_init=true", f"student.config_file={files['student']}",
        "teacher.random_init=true", f"teacher.config_file={files['teacher']}",
        "rollout.batch_size=6", "rollout.micro_batch_size=6", "rollout.max_new_tokens=4",
        "loss.keep_ratio=0.2", "data.eval_size=8", "eval.batch_size=8", "eval.max_new_tokens=4",
        f"logging.out_dir={tmp_path / 'out'}", "logging.tensorboard=false", "logging.progress_bar=false",
        "logging.plot=false", "threads=2", "optim.freeze_embeddings=false", *extra])


def _reference_loss(cfg, models, mbs, masks, normalizer):
    """docs/math.md, Loss and gradients from full float64 logits, summed over the kept rows only."""
    total = 0.0
    w_s = head.lm_head_weight(models.student)
    w_t = head.lm_head_weight(models.teacher)
    tau = cfg.loss.temperature
    for mb, keep in zip(mbs, masks):
        # an independent reference: the shift written out here, not head.call_with_full_head's
        h_s = head.final_hidden(models.student, mb.input_ids, mb.attention_mask, mb.position_ids)[:, :-1]
        with torch.no_grad():
            h_t = head.final_hidden(models.teacher, mb.input_ids, mb.attention_mask, mb.position_ids)[:, :-1]
        rows_s, rows_t = h_s[keep].double(), h_t[keep].double()
        lp_s = torch.log_softmax(rows_s @ w_s.double().T / tau, -1)
        lp_t = torch.log_softmax(rows_t @ w_t.double().T / tau, -1)
        kl = (lp_s.exp() * (lp_s - lp_t)).sum(-1)
        total = total + kl.sum() / normalizer
    return total


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [6, 4])
def test_one_step_gradients_flow_only_through_kept_positions(tmp_path, micro):
    cfg = _tiny_cfg(tmp_path, f"rollout.micro_batch_size={micro}")
    torch.manual_seed(0)
    models = run.build_models(cfg, torch.device("cpu"))
    examples = run.sample_prompts(cfg, models.task, step=0)
    ro = run.rollout(cfg, models, examples, step=0)
    assert ro.response_mask.sum() > 0
    mbs = run.micro_batches(cfg, ro)
    stats, h_t = run.compute_stats(cfg, models, mbs)
    assert all(st.score is None and st.kept is None for st in stats)  # statistics only: no local selection
    masks, normalizer, allstats = run.select(cfg, stats, mbs, step=0)
    n_valid = int(sum(int(mb.valid.sum()) for mb in mbs))
    assert 0 < normalizer < n_valid  # a real selection: some valid positions are not kept
    assert allstats.num_kept == normalizer
    for mb, keep in zip(mbs, masks):
        assert not (keep & ~mb.valid).any()  # only response positions are ever kept
    loss = sum(run.loss_backward(cfg, models, mb, t, st, k, normalizer) for mb, t, st, k in zip(mbs, h_t, stats, masks))
    got = _grads(models.student)
    assert not any(p.grad is not None for p in models.teacher.parameters())
    models.student.zero_grad(set_to_none=True)
    ref = _reference_loss(cfg, models, mbs, masks, normalizer)
    ref.backward()
    want = _grads(models.student)
    assert math.isclose(loss, float(ref.detach()), rel_tol=1e-4, abs_tol=1e-6)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name].to(got[name].dtype), rtol=2e-3, atol=1e-6, msg=name)
    # the optimizer step changes the student
    before = {n: p.detach().clone() for n, p in models.student.named_parameters()}
    models.student.zero_grad(set_to_none=True)
    for mb, t, st, k in zip(mbs, h_t, stats, masks):
        run.loss_backward(cfg, models, mb, t, st, k, normalizer)
    opt, sched = run.build_optimizer(cfg, models.student)
    run.optimizer_step(cfg, models.student, opt, sched)
    changed = [n for n, p in models.student.named_parameters() if not torch.equal(p, before[n])]
    assert changed


def test_train_step_metrics(tmp_path):
    cfg = _tiny_cfg(tmp_path, "loss.estimator=sampled", "loss.strategy=tip")
    models = run.build_models(cfg, torch.device("cpu"))
    opt, sched = run.build_optimizer(cfg, models.student)
    m = run.train_step(cfg, models, opt, sched, step=0)
    for key in ("loss", "kept_fraction", "kl/all", "kl/kept", "C/all", "C/kept", "D/all", "D/kept",
                "response_length", "tokens_per_s", "peak_mem_mb"):
        assert key in m and math.isfinite(m[key]), key
    assert 0 < m["kept_fraction"] < 1


@pytest.mark.parametrize("strategy", ["teachability", "incompatible", "divergence", "entropy", "tip", "compat",
                                      "teachability_entropy", "random", "all"])
def test_every_strategy_runs_from_the_same_config(tmp_path, strategy):
    cfg = _tiny_cfg(tmp_path, f"loss.strategy={strategy}")
    models = run.build_models(cfg, torch.device("cpu"))
    opt, sched = run.build_optimizer(cfg, models.student)
    m = run.train_step(cfg, models, opt, sched, step=0)
    assert math.isfinite(m["loss"]) and 0 < m["kept_fraction"] <= 1
    if strategy == "all":
        assert m["kept_fraction"] == 1


def test_hooks_see_every_step_and_evaluation(tmp_path):
    """The loop's callbacks (what the experiments watch a run through): every step's metrics with the loss
    head's own time, every evaluation with its step and model, and an evaluation the hooks hand in is
    used instead of evaluating."""
    from taopd_train.hooks import Hooks

    class Record(Hooks):
        def __init__(self):
            self.steps, self.evals, self.asked = [], [], []

        def on_step_end(self, step, metrics):
            self.steps.append((step, metrics["loss_head_s"]))

        def reuse_evaluation(self, step, which):
            self.asked.append((step, which))
            return {"accuracy": 0.75, "n": 1, "samples": []} if which == "teacher" else None

        def on_evaluate(self, step, which, result, model):
            self.evals.append((step, which, result["accuracy"], model))

    rec = Record()
    summary = run.train(_tiny_cfg(tmp_path, "optim.steps=2", "eval.every=1"), log=lambda m: None, hooks=rec)
    assert [s for s, _ in rec.steps] == [1, 2] and all(t > 0 for _, t in rec.steps)
    assert rec.asked == [(0, "teacher"), (0, "student"), (1, "student"), (2, "student")]
    assert [(s, w) for s, w, _, _ in rec.evals] == rec.asked
    assert all((m is rec.evals[1][3]) == (w == "student") for _, w, _, m in rec.evals)  # the model evaluated
    assert rec.evals[0][2] == 0.75 and summary["teacher_accuracy"] == 0.75  # handed in, not evaluated
    assert summary["student_after"] == rec.evals[-1][2]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["optim.steps=3", "eval.at_start=false", "eval.every=0", "checkpoint.keep_last=0",
              "optim.warmup_steps=1", "optim.schedule=cosine"]
    run.train(_tiny_cfg(tmp_path / "a", *common), log=lambda m: None)  # uninterrupted: 3 steps
    # interrupted: stop after step 1 (checkpoint at the end), then resume from the latest checkpoint
    run.train(_tiny_cfg(tmp_path / "b", *common, "optim.steps=1"), log=lambda m: None)
    run.train(_tiny_cfg(tmp_path / "b", *common, "checkpoint.resume=latest"), log=lambda m: None)

    def losses(d):
        rows = [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(lb) == [1, 2, 3]
    for s in (1, 2, 3):
        assert math.isclose(la[s], lb[s], rel_tol=1e-6, abs_tol=1e-9), (s, la[s], lb[s])
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "out" / "checkpoints" / "step_000003" / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "out" / "checkpoints" / "step_000003" / "student" / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit
    ckpt = tmp_path / "b" / "out" / "checkpoints" / "step_000001"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # tensors and plain types only
    assert state["step"] == 1 and "optimizer" in state and "scheduler" in state and "rng" in state
    assert (ckpt / "student" / "config.json").is_file()


# ------------------------------------------------------------------ the built-in default run


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job (`python train/run.py`), once: built-in models (SFT-prepared, cached), TA-OPD 0.05."""
    out = tmp_path_factory.mktemp("default")
    cfg = load_config(None, [f"logging.out_dir={out}", "logging.progress_bar=false", "checkpoint.every=0"])
    assert cfg.loss.keep_ratio == 0.05 and cfg.loss.strategy == "teachability"
    return out, run.train(cfg)


@pytest.mark.slow
def test_default_run_raises_student_accuracy(default_run):
    """The built-in default (long_arithmetic, shipped prepared weights): the targets of its issue that it
    meets. Measured on a 2-core CPU: teacher 0.975, student 0.342 -> 0.502 (n=512), mean kept fraction 0.055."""
    out, summary = default_run
    t, b, a = summary["teacher_accuracy"], summary["student_before"], summary["student_after"]
    assert t >= 0.9 and 0.2 <= b <= 0.5, summary  # a strong teacher, a clearly weaker student
    assert a >= b + 0.10, summary  # OPD with TA-OPD selection raises held-out accuracy
    kept = [json.loads(line)["kept_fraction"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]
    assert len(kept) == 60 and sum(kept) / len(kept) <= 0.08  # keep_ratio 0.05 keeps ~5%, not 30%
    assert (out / "curves.png").is_file() and (out / "metrics.jsonl").is_file()
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue #13's goal, not met yet: the default closes 25% of the gap "
                                        "in its 60 steps (train/README.md, The built-in default)")
def test_default_run_closes_half_the_gap(default_run):
    _, summary = default_run
    t, b, a = summary["teacher_accuracy"], summary["student_before"], summary["student_after"]
    assert a >= b + 0.5 * (t - b), summary


def test_wandb_logging_needs_the_package_and_logs_every_scalar(tmp_path, monkeypatch):
    """logging.wandb: a clear config error without the package; with it, the run's scalars reach
    wandb.log at their steps, the config is recorded, and a resumed run reuses the wandb run id."""
    import importlib.machinery
    import sys
    import types

    from taopd_train.metrics import Logger

    if "wandb" not in sys.modules:
        try:
            import wandb  # noqa: F401
        except ImportError:
            with pytest.raises(ConfigError, match="logging.wandb.*pip install wandb"):
                load_config(None, ["logging.wandb=true"])
    calls = []

    class FakeRun:
        id = "run-123"

        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, ["logging.wandb=true", "logging.wandb_mode=offline", f"logging.out_dir={tmp_path}",
                             "logging.progress_bar=false", "logging.tensorboard=false"])
    logger = Logger(cfg, total=3, initial=0)
    logger.log(1, {"loss": 0.5, "kept_fraction": 0.05, "note": "text", "flag": True})
    logger.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["id"] is None and init["config"]["logging"]["wandb"] is True
    assert calls[1] == ("log", 1, {"train/loss": 0.5, "train/kept_fraction": 0.05}) and calls[2] == ("finish",)
    assert (tmp_path / "wandb_id.txt").read_text() == "run-123"
    Logger(cfg, total=3, initial=1, resumed=True).close()
    assert calls[3][1]["id"] == "run-123" and calls[3][1]["resume"] == "allow"


def test_curves_have_integer_step_ticks(tmp_path):
    """A short run's curves.png shows whole steps on its x axes (issue 24)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train import metrics

    saved = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved["ticks"] = [t for ax in fig.axes for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        metrics.plot_curves({"train": [(1, 2.0), (2, 1.5), (3, 1.2)], "eval": [(1, 0.2), (3, 0.4)]},
                            tmp_path / "curves.png")
    finally:
        plt.Figure.savefig = original
    assert saved["ticks"] and all(float(t).is_integer() for t in saved["ticks"]), saved["ticks"]
