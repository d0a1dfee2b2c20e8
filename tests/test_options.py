"""The loss head's options are defined once (taopd_kernels/options.py): every public entry point takes its
defaults from ``DEFAULTS``, and no package source spells an option's default a second time."""

from __future__ import annotations

import ast
import inspect
import pathlib
from dataclasses import fields

import pytest

import taopd_kernels
from taopd_kernels import backends, options, reference, selection
from taopd_kernels.options import DEFAULTS, LossHeadOptions, default_vocab_size

OPTION_NAMES = {f.name for f in fields(LossHeadOptions)}
PACKAGE = pathlib.Path(taopd_kernels.__file__).parent

# Entry point -> the options it must take (at least); each one's default is checked against DEFAULTS.
HEAD = {"top_k", "temperature", "vocab_size", "backend", "chunk_rows", "chunk_vocab"}
SELECT = {"strategy", "keep_ratio", "min_per_sequence", "seed"}
ENTRY_POINTS = {
    taopd_kernels.fused_teachability_kl: HEAD | SELECT | {"estimator", "check_finite"},
    taopd_kernels.teachability_stats: HEAD | SELECT | {"check_finite"},
    taopd_kernels.teachability_kl_from_logits: HEAD | SELECT | {"estimator"},
    taopd_kernels.select_positions: SELECT,
    taopd_kernels.select_across: SELECT,
    taopd_kernels.teachability_kl_loss: OPTION_NAMES,
    taopd_kernels.TeachabilityKLLoss.__init__: OPTION_NAMES,
    taopd_kernels.labels_to_positions: {"ignore_index"},
    reference.reference_teachability_kl: (HEAD | SELECT | {"estimator"}) - {"backend", "chunk_rows", "chunk_vocab"},
    selection.strategy_scores: {"seed"},
    selection.select_top: {"min_per_sequence"},
    selection.select_parts: SELECT,
    backends.resolve: {"top_k"},
}


@pytest.mark.parametrize("fn", list(ENTRY_POINTS), ids=lambda fn: fn.__qualname__)
def test_entry_point_defaults_are_the_options_defaults(fn):
    params = inspect.signature(fn).parameters
    missing = ENTRY_POINTS[fn] - set(params)
    assert not missing, f"{fn.__qualname__} lacks {sorted(missing)}"
    for name in OPTION_NAMES & set(params):
        if params[name].default is not inspect.Parameter.empty or name in ENTRY_POINTS[fn]:
            assert params[name].default == getattr(DEFAULTS, name), (fn.__qualname__, name)


def test_trl_config_defaults_are_the_options_defaults():
    trl = pytest.importorskip("taopd_kernels.integrations.trl")
    taken = {f.name[len("taopd_"):]: f for f in fields(trl.TAOPDConfig) if f.name[len("taopd_"):] in OPTION_NAMES}
    assert {"strategy", "keep_ratio", "top_k", "estimator", "min_per_sequence", "backend"} <= set(taken)
    for name, f in taken.items():
        assert f.default == getattr(DEFAULTS, name), name
        assert f.metadata["help"] == LossHeadOptions.doc(name)


def test_every_option_has_a_default_and_a_doc():
    for f in fields(LossHeadOptions):
        assert LossHeadOptions.doc(f.name).strip(), f.name
        assert getattr(DEFAULTS, f.name) == f.default
    with pytest.raises(Exception):
        DEFAULTS.top_k = 3  # frozen: nobody changes the defaults at run time
    assert default_vocab_size(151936, 152064) == 151936


def _option_defaults(tree: ast.AST):
    """(line, option name, default node) for every default the source gives a parameter or dataclass field
    named after an option (``taopd_<name>`` too): function arguments and ``name: T = field(default=...)``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pairs:
                yield node.lineno, arg.arg, default
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("field", "_option"):
                kw = {k.arg: k.value for k in value.keywords}
                value = kw.get("default", value.args[0] if value.args else None)
            if value is not None:
                yield node.lineno, node.target.id, value


def test_no_option_default_is_written_twice_in_the_package():
    """Outside ``LossHeadOptions`` itself, a parameter named after an option defaults to ``DEFAULTS.<name>``
    or has no default: never a literal of its own (which could drift from the one in options.py). A plain
    ``None`` is "not given" (the backends' own chunk sizes, a field not filled yet), not a value: the
    public entry points' None defaults are compared with ``DEFAULTS`` by the signature test above."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        exempt = set()
        if path.name == "options.py":
            cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LossHeadOptions")
            exempt = {id(n) for n in ast.walk(cls)}
        for line, name, default in _option_defaults(tree):
            option = name[len("taopd_"):] if name.startswith("taopd_") else name
            if option not in OPTION_NAMES or id(default) in exempt:
                continue
            if isinstance(default, ast.Constant) and default.value is None:
                continue
            ok = (isinstance(default, ast.Attribute) and default.attr == option
                  and isinstance(default.value, ast.Name) and default.value.id == "DEFAULTS")
            if not ok:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name} = {ast.unparse(default)}")
    assert not found, "option defaults written outside options.DEFAULTS:\n" + "\n".join(found)


def test_the_default_vocabulary_rule_is_written_once():
    """``min(V_s, V_t)`` lives in ``default_vocab_size``; everything else calls it."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "min" and len(node.args) == 2 \
                    and all("shape" in ast.unparse(a) for a in node.args):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "\n".join(found)
    assert "default_vocab_size" in inspect.getsource(options)


def test_entry_points_show_each_option_they_take_in_their_help():
    """``with_option_docs``: the docstring lists each option the function takes, with its default and meaning."""
    for fn in (taopd_kernels.fused_teachability_kl, taopd_kernels.teachability_stats,
               taopd_kernels.teachability_kl_from_logits, taopd_kernels.select_positions,
               taopd_kernels.teachability_kl_loss):
        taken = OPTION_NAMES & set(inspect.signature(fn).parameters)
        for name in taken:
            line = f"{name} (default {getattr(DEFAULTS, name)!r}): {LossHeadOptions.doc(name)}"
            assert line in fn.__doc__, (fn.__name__, name)
