"""The driver's layout, read from its sources: the experiments stay out of the driver, no package code
rewires another module of the project, the driver's modules find each other by relative imports, and
functions stay short enough to read."""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "train"
PACKAGES = {"taopd_kernels": ROOT / "taopd_kernels", "taopd_train": TRAIN}
# python train/compare.py, train/diagnose.py, train/theta0.py: entry points into the experiments, nothing else
ENTRY_POINTS = {"compare.py", "diagnose.py", "theta0.py"}


def _sources(package: str):
    """(dotted module name, path, AST) of every module of a package."""
    root = PACKAGES[package]
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name an ``import from`` names (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}"


def _is_project_module(name: str) -> bool:
    if name.split(".")[0] not in PACKAGES:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imported(module: str, path: Path, tree: ast.AST):
    """(absolute name, local alias or None, node) of every import of a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, a.asname or (a.name if "." not in a.name else None), node
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            yield base, None, node
            for a in node.names:
                yield f"{base}.{a.name}", a.asname or a.name, node


def _module_aliases(module: str, path: Path, tree: ast.AST) -> set:
    return {alias for name, alias, _ in _imported(module, path, tree)
            if alias is not None and _is_project_module(name)}


def _assignments_to_modules(module: str, path: Path, tree: ast.AST) -> list:
    """``mod.attr = ...`` (also augmented, annotated, del) and ``setattr(mod, ...)`` / ``delattr(mod, ...)``
    where ``mod`` is a module of the project imported here."""
    mods = _module_aliases(module, path, tree)
    found = []

    def hit(target, node):
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in mods:
            found.append(f"{_where(path, node)}: {target.value.id}.{target.attr}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                for sub in ast.walk(t):
                    hit(sub, node)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            hit(node.target, node)
        elif isinstance(node, ast.Delete):
            for t in node.targets:
                hit(t, node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in mods):
            found.append(f"{_where(path, node)}: {node.func.id}({node.args[0].id}, ...)")
    return found


def test_the_checks_see_what_they_look_for(tmp_path):
    """The AST checks themselves, on a module that does everything they forbid."""
    bad = tmp_path / "bad.py"
    bad.write_text("from taopd_train import run\nimport taopd_train.config as config\nfrom .. import head\n"
                   "from ..experiments import compare\n"
                   "run.train = None\nconfig.DTYPES += {}\nsetattr(head, 'lm_head', None)\ndel run.evaluate\n"
                   "x = object()\nx.train = 1\n")
    tree = ast.parse(bad.read_text())
    found = _assignments_to_modules("taopd_train.experiments.bad", bad, tree)
    assert sorted(f.split(": ", 1)[1] for f in found) == ["config.DTYPES", "run.evaluate", "run.train",
                                                          "setattr(head, ...)"]
    names = {name for name, _, _ in _imported("taopd_train.experiments.bad", bad, tree)}
    assert "taopd_train.experiments.compare" in names and "taopd_train.head" in names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_package_code_assigns_to_another_modules_attributes(package):
    """Code observes the driver through its hooks (taopd_train.hooks), never by replacing its functions;
    tests may monkeypatch."""
    found = [f for module, path, tree in _sources(package) for f in _assignments_to_modules(module, path, tree)]
    assert not found, "assignments to another module's attributes:\n" + "\n".join(found)


def test_the_driver_imports_no_experiment_code():
    found = []
    for module, path, tree in _sources("taopd_train"):
        if module.startswith("taopd_train.experiments") or path.parent == TRAIN and path.name in ENTRY_POINTS:
            continue
        found += [f"{_where(path, node)}: {name}" for name, _, node in _imported(module, path, tree)
                  if name == "taopd_train.experiments" or name.startswith("taopd_train.experiments.")]
    assert not found, "driver modules importing experiment code:\n" + "\n".join(found)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_the_entry_points_only_hand_over(name):
    """train/compare.py and train/diagnose.py: a docstring and the hand-over to the experiments' main."""
    tree = ast.parse((TRAIN / name).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    imported = {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported == {f"taopd_train.experiments.{name[:-3]}.main"}


def test_driver_modules_import_each_other_relatively():
    """A reader finds the folder: ``from . import checkpoint``, not ``taopd_train.checkpoint`` (run.py's
    script bootstrap and the entry points name the installed package on purpose: a script has none)."""
    found = []
    for module, path, tree in _sources("taopd_train"):
        if path.parent == TRAIN and path.name in ENTRY_POINTS:
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{_where(path, node)}: {n}" for n in names
                      if n.split(".")[0] == "taopd_train"]
    assert found == ["train/run.py:24: taopd_train.run"], found


def test_loss_config_defaults_are_the_librarys():
    """train/config.py's LossConfig takes every loss-head default from taopd_kernels.options.DEFAULTS (the
    driver's own choice: check_finite off), and writes none of them again."""
    import dataclasses

    from taopd_kernels import DEFAULTS
    from taopd_train.config import LossConfig

    ours = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    assert {k: v for k, v in ours.items() if k != "check_finite"} == \
        {k: getattr(DEFAULTS, k) for k in ours if k != "check_finite"}
    assert ours["check_finite"] is False
    tree = ast.parse((TRAIN / "config.py").read_text())
    loss_cfg = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LossConfig")
    literal = [s.target.id for s in loss_cfg.body if isinstance(s, ast.AnnAssign) and isinstance(s.value, ast.Constant)
               and s.target.id != "check_finite"]
    assert not literal, f"LossConfig defaults written as literals: {literal}"
