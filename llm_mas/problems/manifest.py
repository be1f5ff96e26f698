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


# ------------------------------------------------------------------------------ starting from a run's alignment
INIT_SPEC_KEYS = ("kind", "k", "dtype", "standardize")   # what must agree (the seed need not; d is checked later)


def _init_target(ref: str) -> tuple[Path, int | None]:
    """``DIR`` or ``DIR#i`` (model i of that run) -> (run directory, index or None)."""
    path = Path(ref)
    if "#" in ref and not path.is_dir():
        head, _, tail = ref.rpartition("#")
        if tail.isdigit():
            return Path(head), int(tail)
    return path, None


def read_alignment_init(ref: str, name: str) -> tuple[Path, int, dict[str, Any]]:
    """The run directory, model index and ``alignments.json`` model entry that ``alignment_init: ref`` names for
    a model called `name` (``ref``: a finished run's directory, whose model of the same name is meant, or
    ``DIR#i`` for its model i). Raises ConfigError naming what is missing and the fix; reads no tensors."""
    import json

    from ..errors import ConfigError

    run, index = _init_target(ref)
    missing = [f for f in (MANIFEST, "alignments.safetensors") if not (run / f).is_file()]
    if missing:
        raise ConfigError(f"alignment_init {ref!r}: {run} has no {' or '.join(missing)}; name the directory of a "
                          "finished run (written by llm-mas mas / compare)")
    try:
        manifest = json.loads((run / MANIFEST).read_text())
        models = list(manifest["models"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"alignment_init {ref!r}: {run / MANIFEST} is not a run's alignment manifest ({e})") from None
    names = [m.get("name") for m in models]
    if index is None:
        found = [i for i, n in enumerate(names) if n in (name, Path(name).name)]   # a task checkpoint: its folder
        if len(found) != 1:
            how = "has no model" if not found else f"has {len(found)} models"
            raise ConfigError(f"alignment_init {ref!r}: that run {how} named {name!r} (its models: "
                              f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}); write {run}#<i> to start "
                              "from its model i")
        index = found[0]
    if not 0 <= index < len(models):
        raise ConfigError(f"alignment_init {ref!r}: that run has models 0..{len(models) - 1}; got index {index}")
    entry = models[index]
    if not isinstance(entry.get("alignment"), dict):
        raise ConfigError(f"alignment_init {ref!r}: model {index} of that run has no alignment of its own "
                          f"(intervention {manifest.get('intervention')!r}); start from an interchange run")
    return run, index, {**entry, "run_k": manifest.get("k"), "run_variables": manifest.get("variables")}


def alignment_init_problems(ref: Any, name: str, alignment: str, standardize: bool, options: dict[str, Any],
                            where: str) -> tuple[list[str], dict[str, Any] | None]:
    """Preflight checks of ``alignment_init`` (no tensors read): the run and model exist and its alignment's
    kind, standardisation and options are this entry's. Returns the problems and the run's model entry
    (None when it could not be read)."""
    from ..errors import ConfigError

    if not isinstance(ref, str) or not ref:
        return [f"{where}.alignment_init must be a run directory (a string), got {ref!r}"], None
    try:
        _, index, entry = read_alignment_init(ref, name)
    except ConfigError as e:
        return [f"{where}.{e}"], None
    spec = entry["alignment"]
    p = []
    mine = {"kind": alignment, "standardize": bool(standardize), **options}
    for key, value in mine.items():
        if key in spec and spec[key] != value:
            p.append(f"{where}.alignment_init: model {index} of {ref!r} has {key} {spec[key]!r}, this entry "
                     f"{value!r}; set the entry's {key} to {spec[key]!r} or start from a run that matches")
    return p, entry


def _init_state(run: Path, index: int, standardized: bool) -> dict[str, torch.Tensor]:
    """Model `index`'s tensors in the run's ``alignments.safetensors`` (prefix removed; a standardised
    alignment's mean and std left out: the run that starts from them keeps its own)."""
    from safetensors.torch import load_file

    prefix = f"model{index}."
    state = {k[len(prefix):]: v for k, v in load_file(str(run / "alignments.safetensors")).items()
             if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not (standardized and k in ("mean", "std"))}


def alignment_init_digest(ref: str, name: str) -> str:
    """A digest of the tensors ``alignment_init: ref`` copies for model `name` (its fingerprint value)."""
    from ..models.modules import tensors_digest

    run, index, entry = read_alignment_init(ref, name)
    return tensors_digest(_init_state(run, index, bool(entry["alignment"].get("standardize"))))


def load_alignment_init(alignment: torch.nn.Module, ref: str, name: str, statistics: bool = False) -> None:
    """Copy model `name`'s trained parameters from the run ``ref`` names into `alignment` (a standardised
    alignment keeps its own mean and std: only ``inner.*`` is copied; with `statistics` the run's mean and
    std too, which is the trained map itself: what scoring a run's alignment on other pairs needs, since
    statistics re-estimated from another sample change what a rotation swaps). Raises ConfigError when the
    spec (kind, k, dtype, standardisation, width) differs."""
    from ..errors import ConfigError

    run, index, entry = read_alignment_init(ref, name)
    theirs, mine = entry["alignment"], alignment.spec
    differ = [f"{k} {theirs.get(k)!r} (this run: {mine.get(k)!r})" for k in (*INIT_SPEC_KEYS, "d")
              if k in mine and theirs.get(k) != mine.get(k)]
    if differ:
        raise ConfigError(f"alignment_init {ref!r}: model {index}'s alignment differs from this run's for "
                          f"{name!r}: {'; '.join(differ)}; start from a run with the same k, width and alignment")
    keep_own = bool(mine.get("standardize")) and not statistics
    state = _init_state(run, index, keep_own)
    own = alignment.state_dict()
    wanted = {k for k in own if not (keep_own and k in ("mean", "std"))}
    if set(state) != wanted or any(state[k].shape != own[k].shape for k in wanted):
        raise ConfigError(f"alignment_init {ref!r}: the tensors of model {index} in {run / 'alignments.safetensors'} "
                          f"do not fit this alignment ({sorted(set(state) ^ wanted)[:4] or 'shapes differ'})")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k])
