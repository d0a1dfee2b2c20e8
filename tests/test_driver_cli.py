"""The driver's command line as a new user meets it (issue 24): ``--help`` lists every setting with its
default and the bundled configs; a config missing several settings says all of them in one error; a run
that fails at start leaves no folder behind. Fast: no model is prepared or loaded."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from taopd_train import config, run
from taopd_train.config import CONFIG_DIR, Config, ConfigError, load_config

RUN_PY = Path(run.__file__)  # the driver under test (also when another checkout is on PYTHONPATH)


def _leaf_settings(obj, prefix=""):
    """(dotted key, default) of every leaf setting, walked from the dataclasses themselves."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_settings(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _help_text(width=100) -> str:
    env = {**os.environ, "COLUMNS": str(width)}
    proc = subprocess.run([sys.executable, str(RUN_PY), "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# ------------------------------------------------------------------ 1. --help


def test_help_lists_every_setting_with_its_default_its_meaning_and_the_bundled_configs():
    text = _help_text(width=100)
    lines = text.splitlines()
    for key, default in _leaf_settings(Config()):
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                               default_flow_style=True).strip().removesuffix("...").strip()
        assert any(ln.strip().startswith(f"{key} = {shown}") for ln in lines), f"{key} = {shown} not in --help"
        assert yaml.safe_load(shown) == (list(default) if isinstance(default, tuple) else default)  # reads back
    assert "  optim.lr = 0.0002" in text and "  teacher.tiny.hidden_size = 128" in text  # the teacher's own default
    # the meaning, from the field's comment (on its line, or above it) or the library's option docs
    assert "rollout.batch_size = 32" in text and "prompts per optimizer step" in text
    assert "which prompts the student is scored on" in text  # eval.prompts: the comment above the field
    assert "K of both top-K sets" in text  # loss.top_k: LossHeadOptions' doc
    for name in [p.stem for p in CONFIG_DIR.glob("*.yaml")]:
        first = next(ln for ln in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines() if ln.startswith("#"))
        words = " ".join(first.lstrip("#").split()[:4])
        assert any(ln.startswith(f"  {name} ") and words in ln for ln in lines), f"bundled config {name} not listed"
    assert "qwen3-1.7b" not in [ln.split()[0] for ln in lines if ln.startswith("  ") and ln.split()]  # a model file
    assert max(len(ln) for ln in lines) <= 100, "wider than the terminal"


def test_help_is_generated_from_the_dataclasses_and_their_comments():
    """A field added with a comment shows up without anyone writing it into a list."""

    @dataclasses.dataclass
    class Extra:
        # a comment above
        # on two lines
        alpha: int = 3
        beta: float = 0.5  # the comment on its line
        gamma: bool = False

    docs = config.field_docs(Extra)
    assert docs == {"alpha": "a comment above on two lines", "beta": "the comment on its line"}
    rows = dict(config._settings_rows(Extra(), "extra."))
    assert rows == {"extra.alpha = 3": "a comment above on two lines", "extra.beta = 0.5": "the comment on its line",
                    "extra.gamma = false": ""}


# ------------------------------------------------------------------ 2. all problems at once


@pytest.fixture
def no_gpu_no_hub(monkeypatch, tmp_path):
    """This machine as the issue saw it, on any machine: no CUDA, no hub, no HF cache; cwd a fresh folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_qwen3_without_its_settings_reports_every_missing_one_at_once(no_gpu_no_hub, capsys):
    rc = run.main(["--config", "qwen3"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("config error") == 1 and "4 problems" in err, err
    for said in ("device='cuda': CUDA is not available", "data.source='data/math_train.jsonl': no such file",
                 "student.path='Qwen/Qwen3-1.7B'", "teacher.path='Qwen/Qwen3-4B'"):
        assert said in err, f"{said!r} missing from:\n{err}"
    assert "hf download Qwen/Qwen3-1.7B" in err and "device=cpu" in err  # what to do
    assert not (no_gpu_no_hub / "runs").exists()


def test_value_problems_and_start_up_problems_come_in_one_error(no_gpu_no_hub, capsys):
    rc = run.main(["--config", "qwen3", "optim.lr=0", "loss.nope=1", "seed=1.5", "device=cuda:0",
                   "data.source=./nope.jsonl", "student.random_init=true", "student.config_file=qwen3-1.7b.json",
                   "teacher.random_init=true", "teacher.config_file=no-such.json"])
    err = capsys.readouterr().err
    assert rc == 2 and "6 problems" in err, err
    for key in ("optim.lr=0.0", "'loss.nope'", "seed:", "device='cuda:0'", "data.source='./nope.jsonl'",
                "teacher.config_file='no-such.json'"):
        assert key in err, f"{key!r} missing from:\n{err}"
    assert "student." not in err  # a random student from a bundled architecture needs nothing else


def test_the_api_raises_every_start_up_problem_in_one_config_error(no_gpu_no_hub):
    cfg = load_config("qwen3")
    with pytest.raises(ConfigError) as err:
        run.train(cfg, log=lambda m: None)
    assert sorted(key for key, _ in err.value.problems) == ["data.source", "device", "student.path", "teacher.path"]
    with pytest.raises(ConfigError) as err:  # every value problem of a config at once, too
        load_config(None, ["optim.lr=0", "loss.keep_ratio=2", "student.tiny.num_heads=0", "precision=fp8"])
    assert sorted(k for k, _ in err.value.problems) == ["loss.keep_ratio", "optim.lr", "precision",
                                                        "student.tiny.num_heads"]


def test_under_torchrun_the_batch_over_the_ranks_is_among_the_problems(no_gpu_no_hub, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets them: checked before any process group starts
    rc = run.main(["rollout.batch_size=6", "device=cuda", f"logging.out_dir={no_gpu_no_hub / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 problems" in err and "rollout.batch_size=6: must be divisible by the number of ranks (4)" \
        in err and "device='cuda'" in err, err


def test_one_problem_reads_as_before(no_gpu_no_hub, capsys):
    assert run.main(["device=cuda", f"logging.out_dir={no_gpu_no_hub / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: device='cuda': CUDA is not available") and "problems" not in err


# ------------------------------------------------------------------ 3. no empty folders after a failed start


def _fails_after_claiming_its_folders(tmp_path, *extra):
    """A run that gets past the start-up checks (so its folders are claimed) and fails at the vocabulary
    check, before any model is prepared."""
    return run.main(["loss.vocab_size=200000", "eval.at_start=false", *extra])


def test_a_failed_start_leaves_no_folder_it_created(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    ckpt = tmp_path / "elsewhere" / "ckpts"
    assert _fails_after_claiming_its_folders(tmp_path, f"logging.out_dir={out}") == 2
    assert "loss.vocab_size=200000" in capsys.readouterr().err
    assert not (tmp_path / "new").exists(), sorted(p.name for p in (tmp_path / "new").rglob("*"))
    assert _fails_after_claiming_its_folders(tmp_path, f"logging.out_dir={out}", f"checkpoint.dir={ckpt}") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_start_keeps_the_folders_that_were_there(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = tmp_path / "ckpts"
    (ckpt / "step_000001").mkdir(parents=True)
    (ckpt / "notes.txt").write_text("mine")
    assert _fails_after_claiming_its_folders(tmp_path, f"logging.out_dir={out}", f"checkpoint.dir={ckpt}") == 2
    assert out.is_dir() and list(out.iterdir()) == []  # kept, and as it was (no lock file left in it)
    assert (ckpt / "step_000001").is_dir() and (ckpt / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt", "step_000001"]


def test_a_start_up_problem_creates_no_folder(no_gpu_no_hub, capsys):
    out = no_gpu_no_hub / "a" / "b"
    assert run.main(["device=cuda", f"logging.out_dir={out}", f"checkpoint.dir={no_gpu_no_hub / 'c'}"]) == 2
    assert sorted(p.name for p in no_gpu_no_hub.iterdir()) == []


def test_an_unwritable_folder_is_one_of_the_problems_and_nothing_is_created(no_gpu_no_hub, capsys):
    blocker = no_gpu_no_hub / "a_file"
    blocker.write_text("not a folder")
    rc = run.main(["device=cuda", f"logging.out_dir={no_gpu_no_hub / 'out'}", f"checkpoint.dir={blocker / 'ckpt'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 problems" in err and "checkpoint.dir: " in err and "not writable" in err, err
    assert sorted(p.name for p in no_gpu_no_hub.iterdir()) == ["a_file"]
