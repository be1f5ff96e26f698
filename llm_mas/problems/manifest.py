"""``alignments.json``: how a run's trained alignments are rebuilt (`llm_mas.artifacts.evaluate` reads it).

Written by the runner next to ``alignments.safetensors``; it is data only (no import path), and writing it
changes no result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MANIFEST = "alignments.json"
FORMAT = 1


def module_weights_digest(entry: Any) -> str | None:
    """A digest of a module-kind model's state (names, dtypes, shapes, bytes: `state_digest`), the same
    whether it came as an object or as a factory + weights file; None for other kinds."""
    from ..models.modules import read_weights, state_digest, tensors_digest

    if getattr(entry, "kind", None) != "module":
        return None
    if entry.module is not None:
        return state_digest(entry.module)
    if entry.weights is not None and Path(entry.weights).is_file():
        return tensors_digest(read_weights(entry.weights, "models"))
    return None


def alignment_manifest(config: Any, problem: Any, alignments: torch.nn.ModuleList) -> dict[str, Any]:
    """What ``alignments.json`` holds (module docstring)."""
    from ..alignments import Alignment

    models = []
    for i, (entry, model) in enumerate(zip(config.models, problem.models)):
        a = alignments[i] if i < len(alignments) and isinstance(alignments[i], Alignment) else None
        item = {"index": i, "name": model.name, "kind": entry.kind, "site": str(model.site),
                "width": int(model.width), "alignment": a.spec if a is not None else None}
        digest = module_weights_digest(entry)
        if digest is not None:
            item["state_digest"] = digest
        models.append(item)
    blocks = {v: [b.start, b.stop] for v, b in problem.blocks.items()}
    return {"format": FORMAT, "intervention": problem.intervention.name, "k": int(problem.k),
            "variables": list(problem.all_variables), "blocks": blocks, "models": models,
            "tensors": {f"model{i}.{k}": list(v.shape) for i, a in enumerate(alignments)
                        for k, v in a.state_dict().items()}}


def write_alignment_manifest(run_dir: Path, config: Any, problem: Any, alignments: torch.nn.ModuleList) -> None:
    from ..files import atomic_write_json

    atomic_write_json(Path(run_dir) / MANIFEST, alignment_manifest(config, problem, alignments), indent=1)
