"""Installation: the core install (no [llm] extra) runs task-model MAS, LLM commands say what to install, and
a built wheel works on its own, outside the checkout, with its shipped models and presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from llm_mas.commands import LLM_EXTRA_MODULES
from llm_mas.models.registry import shipped_names

REPO = Path(__file__).resolve().parents[1]
TINY_MAS = ["data.n_train=64", "data.n_valid=32", "train.max_steps=2", "progress=false"]

# Runs first in a child interpreter: every import of an [llm] module fails as if it were not installed,
# and each attempt is recorded (so an `except ImportError` fallback cannot hide one).
BLOCK_LLM_EXTRAS = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {LLM_EXTRA_MODULES!r}
    attempted = []

    class BlockLLMExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempted.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, BlockLLMExtras())
""")


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_MAS_MODELS_DIR",)}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    return env


# Every module a task-model user touches (the LLM ones import their libraries inside functions too, but
# they are not the core path).
CORE_MODULES = ("llm_mas", "llm_mas.cli", "llm_mas.api", "llm_mas.run", "llm_mas.run_config", "llm_mas.problems", "llm_mas.trainer",
                "llm_mas.results", "llm_mas.correlative", "llm_mas.similarity", "llm_mas.stats",
                "llm_mas.baselines", "llm_mas.demo", "llm_mas.presets", "llm_mas.models", "llm_mas.tasks",
                "llm_mas.backends")


def test_importing_the_core_needs_no_llm_extras():
    script = BLOCK_LLM_EXTRAS + textwrap.dedent(f"""
        import importlib, json
        for module in {CORE_MODULES!r}:
            importlib.import_module(module)
        import llm_mas
        llm_mas.compare, llm_mas.load_task_model, llm_mas.MASResult   # the lazy top-level names resolve
        print(json.dumps(attempted))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_child_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_task_model_mas_runs_without_the_llm_extras(tmp_path):
    script = BLOCK_LLM_EXTRAS + textwrap.dedent(f"""
        import json
        import llm_mas, llm_mas.cli
        from llm_mas.run import run as run_mas
        from llm_mas.run_config import load_mas_config
        from llm_mas.presets import resolve_preset
        cfg = load_mas_config(resolve_preset("gru_gru_hidden"), {TINY_MAS!r} + ["out_dir={tmp_path}"])
        result = run_mas(cfg)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"attempted": attempted, "loaded": loaded, "run_dir": str(result.run_dir)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_child_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["attempted"] == [] and report["loaded"] == []
    assert (Path(report["run_dir"]) / "results.json").is_file()


def test_llm_commands_without_the_llm_extras_say_what_to_install(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("one prompt\nanother prompt\n")
    script = BLOCK_LLM_EXTRAS + textwrap.dedent(f"""
        from llm_mas.cli import app
        app(["record", "--model", "some/model", "--texts", {str(texts)!r}, "--out", {str(tmp_path / "rec")!r}])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_child_env(),
                         timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "pip install 'llm_mas[llm]'" in out.stderr and "Traceback" not in out.stderr


def _copy_source(destination: Path) -> Path:
    """The files a wheel is built from, copied so the build leaves nothing in the checkout."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    shutil.copytree(REPO / "llm_mas", destination / "llm_mas",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return destination


@pytest.mark.slow
def test_the_wheel_runs_shipped_models_and_presets_outside_the_checkout(tmp_path):
    source = _copy_source(tmp_path / "source")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(wheels)], check=True, env=_child_env(), timeout=600)
    (wheel,) = wheels.glob("llm_mas-*.whl")

    # A fresh venv that sees the already installed dependencies (torch, ...) through a .pth file: a plain path
    # line, so the .pth files over there (the checkout's editable install) are not processed.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (venv_site / "installed_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, env=_child_env(), timeout=600)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _child_env()
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    where = run(str(python), "-c", "import llm_mas; print(llm_mas.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv_site), where          # the wheel's llm_mas, not the checkout's
    listed = run(str(venv / "bin" / "llm-mas"), "list-models").stdout
    for name in shipped_names():
        assert name in listed
    assert str(venv_site / "llm_mas" / "data" / "models") in listed.replace("\n", "")
    presets = run(str(venv / "bin" / "llm-mas"), "list-presets").stdout
    assert "gru_gru_hidden" in presets and "similarity_gru_gru" in presets
    runs = tmp_path / "runs"
    run(str(venv / "bin" / "llm-mas"), "mas", "gru_gru_hidden", *TINY_MAS, f"out_dir={runs}")
    results = (runs / "gru_gru_hidden" / "results.json").read_text()
    assert json.loads(results) and "multiobject-gru-s0" in results and "multiobject-gru-s1" in results
    assert not (work / "runs").exists() and list(work.iterdir()) == []
