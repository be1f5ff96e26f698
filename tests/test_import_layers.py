"""The import-layer contract (pyproject [tool.importlinter]) holds, and it catches an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_contract_is_kept():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the package's sources where sites.py (a foundation) imports the runner: the check fails."""
    shutil.copytree(REPO / "llm_mas", tmp_path / "llm_mas", ignore=shutil.ignore_patterns("data", "__pycache__"))
    sites = tmp_path / "llm_mas" / "sites.py"
    sites.write_text(sites.read_text() + "\n\ndef _upward():\n    from . import run  # noqa: F401\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "llm_mas.sites -> llm_mas.run" in done.stdout
