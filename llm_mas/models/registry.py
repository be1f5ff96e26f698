"""Shipped task-model checkpoints: ``llm_mas/data/models/<name>/`` and ``llm_mas/data/models/manifest.json``
(package data, so a wheel carries them).

    from llm_mas import load_task_model
    model = load_task_model("multiobject-gru-s0")    # by shipped name
    model = load_task_model("runs/my-run")           # or any directory written by `llm-mas train-model`

Each entry of the manifest records the exact training command, the free-running trial accuracy per N
(Arithmetic: per number of operations and per initial-value range), the evaluation seed and the date.
Rebuild it from the checkpoint directories with ``python -m llm_mas.models.registry [DIR]``.

Where models are read and written:

- ``models_dir()`` is ``$LLM_MAS_MODELS_DIR`` when set, else the package's own ``llm_mas/data/models``.
  Every shipped-name lookup (``load_task_model``, ``llm-mas list-models``, MAS configs) reads there.
- ``llm-mas train-model`` writes only where ``--out`` says (default ``runs/<task>-<arch>-s<seed>``); such a
  directory loads by path. To use several of your own models by name, put them under one directory, run
  ``python -m llm_mas.models.registry DIR`` (writes ``DIR/manifest.json``) and set
  ``LLM_MAS_MODELS_DIR=DIR`` (that directory then replaces the shipped models).
- Shipping a new model (in a source checkout, whose ``llm_mas/data/models`` is the working tree):
  ``llm-mas train-model ... --out llm_mas/data/models/NAME`` then ``python -m llm_mas.models.registry``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..resources import package_path
from .task_models import TaskModel, count_parameters

MANIFEST = "manifest.json"
MODELS_DIR_ENV = "LLM_MAS_MODELS_DIR"


def shipped_models_dir() -> Path:
    """The package's own checkpoint directory, ``llm_mas/data/models``."""
    return package_path("data", "models")


def models_dir() -> Path:
    """Where shipped names are looked up: ``$LLM_MAS_MODELS_DIR`` if set, else :func:`shipped_models_dir`."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else shipped_models_dir()


def read_manifest(directory: Path | None = None) -> dict[str, Any]:
    """The manifest as a dict ``{"models": {name: entry}}`` (empty when no model is shipped yet)."""
    path = (directory or models_dir()) / MANIFEST
    if not path.exists():
        return {"models": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} is not valid JSON ({e}); rebuild it with "
                        "`python -m llm_mas.models.registry`") from None


def shipped_names(directory: Path | None = None) -> list[str]:
    """Names of the shipped checkpoints."""
    return sorted(read_manifest(directory)["models"])


def resolve_model_dir(name_or_path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(run directory, manifest entry or None) of a shipped name or a run directory path."""
    manifest = read_manifest()["models"]
    key = str(name_or_path)
    if key in manifest:
        return models_dir() / manifest[key]["path"], manifest[key]
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.yaml").exists():
        return path, None
    from ..errors import closest

    names = sorted(manifest)
    hint = f"Did you mean {', '.join(closest(key, names, n=3))}? " if names else ""
    raise ConfigError(
        f"unknown task model {key!r}: not a shipped name and not a run directory with config.yaml. {hint}"
        f"Shipped names: {', '.join(names) or '(none yet)'}; a directory written by `llm-mas train-model` "
        "also works. Your own torch model: pass the nn.Module itself (compare(models=[module, ...], "
        "data=CounterfactualTensors)) or a `kind: module` entry (factory and weights)")


def load_task_model(name_or_path: str | Path, device: str = "cpu") -> TaskModel:
    """A task model by shipped name or run directory: eval mode, frozen (``requires_grad=False``).

    Loading a shipped model that is below the accuracy bar warns, naming the failing values.
    """
    from .training import load_run

    run_dir, entry = resolve_model_dir(name_or_path)
    if entry is not None and not entry["passes_bar"]:
        import warnings

        warnings.warn(f"task model {str(name_or_path)!r} {below_bar_text(entry)} (see {models_dir() / MANIFEST}); "
                      "MAS results on it are not comparable", stacklevel=2)
    return load_run(run_dir, device=device)


def below_bar(name: str) -> str:
    """Where a shipped task model fails the accuracy bar (its manifest's ``below_bar``, e.g. ``count 4, 9``),
    or "" when it passes or is not a shipped name (a checkpoint directory is the caller's responsibility)."""
    entry = read_manifest()["models"].get(str(name))
    return "" if entry is None or entry.get("passes_bar", True) else _failing_values(entry)


def below_bar_text(entry: dict[str, Any]) -> str:
    """``is below the 0.99 accuracy bar on count 4, 9`` for a failing manifest entry."""
    from .training import BAR

    return f"is below the {BAR} accuracy bar on {_failing_values(entry)}"


def _failing_values(entry: dict[str, Any]) -> str:
    detail = entry.get("below_bar") or {"N": f"min accuracy {entry.get('min_accuracy')}"}
    return "; ".join(f"{group} {', '.join(map(str, values)) if isinstance(values, list) else values}"
                     for group, values in detail.items())


def manifest_entry(run_dir: Path, root: Path) -> dict[str, Any]:
    """The manifest entry of one checkpoint directory (from its config.yaml and metrics.json)."""
    from .training import read_run_config

    config = read_run_config(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise DataError(f"{str(run_dir)!r} has no metrics.json (training not finished?)")
    metrics = json.loads(metrics_path.read_text())
    accuracy = metrics["accuracy"]
    entry = {
        "path": os.path.relpath(run_dir, root),
        "task": metrics["task"], "arch": metrics["arch"], "seed": metrics["seed"],
        "command": config.get("command"),
        "min_accuracy": accuracy["min"], "overall_accuracy": accuracy["overall"],
        "passes_bar": metrics["passes_bar"],
        "accuracy_per_count": accuracy["count"],
        "held_out": metrics["held_out"],
        "eval_seed": metrics["eval_seed"], "n_per_count": metrics["n_per_count"],
        "date": metrics["date"], "train_seconds": metrics["train_seconds"],
        "steps_run": metrics["steps_run"], "best_step": metrics["best_step"],
    }
    if "initial_value" in accuracy:
        entry["accuracy_per_initial_value"] = accuracy["initial_value"]
    from .training import BAR

    below = {group: [value for value, acc in accuracy[group].items() if acc < BAR]
             for group in ("count", "initial_value") if group in accuracy}
    entry["below_bar"] = {group: values for group, values in below.items() if values}
    return entry


def update_manifest(directory: Path | None = None) -> dict[str, Any]:
    """Rebuild ``manifest.json`` from every finished checkpoint directory under `directory` (default
    :func:`models_dir`: ``$LLM_MAS_MODELS_DIR`` or the package's ``llm_mas/data/models``); returns it.

    Directories still training (no metrics.json yet) are left out and listed under ``"unfinished"``.
    """
    from .training import BAR

    root = Path(directory) if directory is not None else models_dir()
    if not root.is_dir():
        raise ConfigError(f"models directory {str(root)!r} does not exist; pass a directory holding run "
                          "directories written by `llm-mas train-model`")
    models, unfinished = {}, []
    for run_dir in sorted(p for p in root.iterdir() if (p / "config.yaml").exists()):
        if not (run_dir / "metrics.json").exists():
            unfinished.append(run_dir.name)
            continue
        entry = manifest_entry(run_dir, root)
        from .training import load_run

        entry["parameters"] = count_parameters(load_run(run_dir))
        models[run_dir.name] = entry
    manifest = {
        "description": "Task models shipped with llm_mas. Accuracy = free-running trial accuracy (every task "
                       "token right) per N in 1..20 (Arithmetic: per number of operations and per initial-value "
                       f"range); bar: >= {BAR} on every value (held-out N included).",
        "models": models,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "unfinished": unfinished}


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    # python -m llm_mas.models.registry [DIR]: DIR defaults to models_dir() ($LLM_MAS_MODELS_DIR or the package's)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else models_dir()
    result = update_manifest(target)
    print(f"wrote {target / MANIFEST}")
    for name, item in result["models"].items():
        flag = "ok" if item["passes_bar"] else "FAILS THE BAR"
        print(f"{name}: min {item['min_accuracy']:.4f} overall {item['overall_accuracy']:.4f} {flag}")
    for name in result["unfinished"]:
        print(f"{name}: not finished (no metrics.json), left out")
