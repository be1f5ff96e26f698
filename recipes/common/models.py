"""The task models a recipe compares: shipped names (``data/models/manifest.json``), checkpoint directories,
or randomly initialised stand-ins of the same architecture (tests, ``--models-from-scratch``)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

import yaml
from safetensors.torch import save_file

from llm_mas.errors import ConfigError
from llm_mas.models import build_task_model
from llm_mas.models.registry import resolve_model_dir
from llm_mas.tasks import get_task


def scratch_checkpoints(names: Iterable[str], directory: str | Path) -> dict[str, str]:
    """Randomly initialised checkpoints standing in for shipped task models (tests, or before models exist).

    A name ``<task>-<arch>-s<seed>`` (e.g. ``rounding-gru-s0``) gives that architecture for that task with
    weights drawn from a seed derived from the whole name; returns ``{name: checkpoint directory}``.
    """
    mapping = {}
    for name in dict.fromkeys(names):
        parts = Path(name).name.split("-")
        if len(parts) < 2:
            raise ConfigError(f"stand-in checkpoints need names like multiobject-gru-s0 (task-arch-seed), "
                              f"got {name!r}")
        task, arch = parts[0], parts[1]
        out = Path(directory) / Path(name).name
        if not (out / "model.safetensors").exists():
            seed = zlib.crc32(name.encode()) % 10_000
            model = build_task_model(arch, task, len(get_task(task).vocab), seed=seed)
            out.mkdir(parents=True, exist_ok=True)
            # the sections of a `llm-mas train-model` run directory that loading and task lookup read
            sections = {"train": {"task": task, "arch": arch, "seed": int(model.config["seed"]), "steps": 0},
                        "model": dict(model.config)}
            (out / "config.yaml").write_text("# random initialisation (stand-in for a shipped model)\n"
                                             + yaml.safe_dump(sections, sort_keys=False))
            weights = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(out / "model.safetensors"))
        mapping[name] = str(out)
    return mapping


def missing_models(names: Iterable[str]) -> list[str]:
    """Names that are neither shipped (``data/models/manifest.json``) nor checkpoint directories."""
    missing = []
    for name in dict.fromkeys(names):
        try:
            resolve_model_dir(name)
        except ConfigError:
            missing.append(name)
    return missing


def resolve_models(names: Iterable[str], scratch_dir: str | Path | None = None) -> dict[str, str]:
    """``{name: what to load}`` for a recipe's models: random-weight stand-ins written into `scratch_dir` when
    it is given (tests, ``--models-from-scratch``), else the names themselves after checking that every one
    is shipped or a checkpoint directory (ConfigError naming the missing ones and the way out)."""
    names = list(dict.fromkeys(names))
    if scratch_dir is not None:
        return scratch_checkpoints(names, scratch_dir)
    missing = missing_models(names)
    if missing:
        raise ConfigError(f"task models not available yet: {', '.join(missing)}. Train them with "
                          "`llm-mas train-model` (see data/models/manifest.json for the shipped ones), pass "
                          "checkpoint directories instead, or add --models-from-scratch for random-weight "
                          "stand-ins")
    return {n: n for n in names}
