"""The `recipes` package: every recipe runs as ``python -m recipes.<name>`` and documents itself there;
recipes import only ``recipes.common`` (and their own sub-package); the library never imports ``recipes``."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["recipes.stitching_vs_mas", "recipes.clmas", "recipes.cross_task", "recipes.correlative_vs_causal",
           "recipes.llm_mas_smoke", "recipes.toxicity.run", "recipes.lm_alignment", "recipes.many_models",
           "recipes.neurogym_example"]


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports (absolute names; relative imports resolved against `path`)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(".".join(p for p in (base, node.module or "") if p))
    return names


def test_every_recipe_module_is_listed():
    found = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "recipes").rglob("*.py")
             if "common" not in p.parts and p.name not in ("__init__.py", "report.py")}
    assert found == set(RECIPES)


@pytest.mark.parametrize("module", RECIPES)
def test_recipe_help_names_its_python_m_command(module, capsys):
    recipe = importlib.import_module(module)
    assert f"python -m {module}" in recipe.__doc__
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_python_m_runs_a_recipe_from_the_repository_root():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "recipes.stitching_vs_mas", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--models-from-scratch" in out.stdout


def test_the_library_imports_nothing_from_recipes():
    offending = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "recipes")
                 for p in (REPO / "llm_mas").rglob("*.py")}
    assert {k: v for k, v in offending.items() if v} == {}


def test_recipes_import_only_common_and_their_own_package():
    bad = {}
    for path in (REPO / "recipes").rglob("*.py"):
        own = ".".join(path.relative_to(REPO).parts[:2]) if len(path.relative_to(REPO).parts) > 2 else None
        for module in imported_modules(path):
            if module.split(".")[0] != "recipes" or module.startswith("recipes.common"):
                continue
            if own is not None and module.startswith(own):  # e.g. recipes.toxicity.run -> recipes.toxicity.report
                continue
            bad.setdefault(str(path.relative_to(REPO)), []).append(module)
    assert bad == {}
