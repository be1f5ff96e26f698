"""A finished run's alignments as artifacts: score them on new counterfactual data without training.

    res = llm_mas.evaluate("runs/gru-vs-gru", models=[gru_a, gru_b], data=new_counterfactuals)
    res.matrix(); res.table()

    llm-mas evaluate runs/gru-vs-gru --data NEW_TENSOR_DIR --factory 0=my_pkg.nets:load_gru_a ...

What a run directory holds (docs/method.md, "Alignments as artifacts"):

- ``alignments.safetensors``: the trained parameters, ``model{i}.{name}`` for model i's alignment (its
  ``state_dict``: e.g. ``model0.weight`` for an orthogonal map, ``model0.inner.*`` / ``mean`` / ``std`` when
  standardised), or the intervention's own maps (``linear_stitch``: one per trained direction);
- ``alignments.json``: how to rebuild them: per model its kind, site, latent width, the alignment's ``spec``
  (`llm_mas.alignments.Alignment.spec`) and a digest of the module's weights, and the run's k, variables,
  aligned blocks and intervention (written next to the tensors; it changes no result);
- ``fingerprint.json``: digests of every model's weights (what the result depends on beyond config.yaml).

Nothing in a run directory is ever imported or executed. A model of kind ``task`` (a checkpoint: weights
and a YAML header) or ``hf`` (weights and configs) is reloaded from its name in config.yaml; any other
model — ``module`` (whose config.yaml names a factory), or a user-registered kind — is what the caller
passes: the ``nn.Module`` object, a factory callable, or a factory import path the caller names.
The config's ``factory`` and ``plugins`` are never read as code. Every model's weights must match the
run's digest, or the evaluation is refused (one error naming the model and both digests).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError
from .problems.manifest import MANIFEST, module_weights_digest

# kinds whose models config.yaml names by data alone (checkpoints, HF weights, recordings): safe to reload
RELOADABLE_KINDS = ("task", "hf", "recorded")


# ------------------------------------------------------------------------------------------ reading
def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{str(path)!r} ({what}) is not readable JSON ({e}); is this a finished run directory?") \
            from None


def _resolve_model(given: Any, entry: dict, index: int) -> dict:
    """The model entry for model ``index`` from what the caller gave (module docstring): a new config entry
    that keeps the run's name, site and alignment settings."""
    from torch import nn

    from .models.modules import build_module

    where = f"models[{index}]"
    kind = entry.get("kind", "task")
    keep = {k: entry[k] for k in ("name", "site", "alignment", "alignment_options", "standardize") if k in entry}
    if given is None:
        if kind in RELOADABLE_KINDS:
            return dict(entry)
        raise ConfigError(f"{where}: the run's model {index} ({entry.get('name')!r}) is of kind {kind!r}, which "
                          "is code: pass the nn.Module itself (models=[...]) or name its factory "
                          "(`--factory {index}=package.module:function`); the factory or plugins a run's "
                          "config.yaml names are never imported")
    from .recordings import RecordedSystem

    if isinstance(given, RecordedSystem):
        return {**keep, "kind": "recorded", "recording": given, "site": "latents"}
    if isinstance(given, dict):
        return {**(entry if given.get("kind", kind) in RELOADABLE_KINDS else keep), **given}
    if isinstance(given, str) and kind in RELOADABLE_KINDS and ":" not in given:
        return {**entry, "name": given}
    if isinstance(given, str):  # a factory the caller names
        module = build_module(given, {}, where)
    elif isinstance(given, nn.Module):
        module = given
    elif callable(given):
        module = given()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{where}: the factory returned a {type(module).__name__}, not a torch.nn.Module")
    else:
        raise ConfigError(f"{where}: expected an nn.Module, a factory (callable or 'package.module:function') or "
                          f"None (kinds task/hf: reload from the run), got {type(given).__name__}")
    return {**keep, "kind": "module", "module": module}


def _weights_problems(run_path: Path, config: Any, manifest: dict | None, fingerprint: dict) -> list[str]:
    """Every model whose weights differ from the run's (module kind: `state_digest` against alignments.json;
    other kinds: the kind's fingerprint digests against fingerprint.json)."""
    from .problems.kinds import model_fingerprint

    problems = []
    values = fingerprint.get("values", {})
    for i, entry in enumerate(config.models):
        name = getattr(entry, "name", i)
        if entry.kind == "module":
            listed = (manifest or {}).get("models") or []
            recorded = listed[i].get("state_digest") if i < len(listed) else None
            if recorded is None and values.get(f"models.{i}.kind") == "module" and f"models.{i}.class" in values:
                recorded = values.get(f"models.{i}.weights")  # a run of module objects: the same digest
            given = module_weights_digest(entry)
            if recorded is None:
                problems.append(f"models[{i}] ({name}): the run records no state digest for this model (its "
                                f"{MANIFEST} is missing: written by an older llm_mas), so its weights cannot be "
                                "checked; rerun the run to write it")
            elif given != recorded:
                problems.append(f"models[{i}] ({name}): its weights differ from the run's (state digest {given} "
                                f"given, {recorded} recorded in {str(run_path)!r}); pass the model the run was "
                                "trained with")
            continue
        for key, digest in model_fingerprint(entry).items():
            if key == "recording":
                continue  # a tensor evaluation reads no recording
            recorded = values.get(f"models.{i}.{key}")
            if recorded is not None and recorded != digest:
                problems.append(f"models[{i}] ({name}): its {key} differ from the run's ({digest} given, {recorded} "
                                f"recorded in fingerprint.json); pass the model the run was trained with")
    return problems


def evaluate(run: str | Path, models: Sequence[Any] | None = None, data: Any = None, *,
             device: str | None = None, seed: int | None = None, batch_size: int | None = None,
             with_ci: bool = True, log: Callable[[str], None] = print):
    """Score a finished run's alignments (no training) and return a `MASResult` (``run_dir`` None: nothing is
    written).

    run: the run directory (config.yaml, fingerprint.json, alignments.safetensors[, alignments.json]).
    models: one per model of the run, in its order: an ``nn.Module`` object, a factory (a callable or a
            'package.module:function' path named here, never read from the run), or None (kinds task and hf
            only: reloaded from the name in config.yaml). Default: None for every model.
    data: `llm_mas.CounterfactualTensors` or a tensor directory (every row is scored), or None: the run's
          own data settings (task and counterfactual runs; ``seed`` draws new pairs).
    Refused (ConfigError) when a model's weights differ from the run's fingerprint.
    """
    from safetensors.torch import load_file

    from .config import from_dict, load_yaml
    from .results import MASResult
    from .run import build_alignments, build_problem
    from .run_config import MASConfig
    from .tasks.tensor_data import CounterfactualTensors

    run_path = Path(run)
    for name in ("config.yaml", "fingerprint.json", "alignments.safetensors"):
        if not (run_path / name).is_file():
            raise ConfigError(f"run {str(run_path)!r} has no {name}; evaluate takes the directory of a finished run "
                              "(written by llm-mas mas / compare)")
    raw = load_yaml(run_path / "config.yaml")          # data only: its plugins and factories are never imported
    fingerprint = _read_json(run_path / "fingerprint.json", "the run's fingerprint")
    manifest = _read_json(run_path / MANIFEST, "the alignment specs") if (run_path / MANIFEST).is_file() else None
    entries = list(raw.get("models") or [])
    given = list(models) if models is not None else [None] * len(entries)
    if len(given) != len(entries):
        raise ConfigError(f"models: the run has {len(entries)} models; got {len(given)} (give one per model, None "
                          "to reload a task/hf model from the run)")
    settings = {k: v for k, v in raw.items() if k not in ("plugins", "models", "data")}
    # a trained run's tensors replace its start: where it started (alignment_init) need not exist any more
    settings["models"] = [_resolve_model(g, {k: v for k, v in dict(e).items() if k != "alignment_init"}, i)
                          for i, (g, e) in enumerate(zip(given, entries))]
    settings["progress"] = False
    if device is not None:
        settings["device"] = device
    if seed is not None:
        settings["seed"] = seed
    if batch_size is not None:
        settings["eval"] = {**(raw.get("eval") or {}), "batch_size": batch_size}
    run_data = dict(raw.get("data") or {})
    if data is None and "data.tensors" in fingerprint.get("values", {}) and not run_data.get("dataset"):
        raise ConfigError("data: this run read counterfactual tensors given in Python (not recorded in the run "
                          "directory); pass data=CounterfactualTensors or a tensor directory")
    if data is None:
        settings["data"] = run_data
    else:
        if isinstance(data, (str, Path)):
            data = CounterfactualTensors.load(data)
        if not isinstance(data, CounterfactualTensors):
            raise ConfigError(f"data: expected llm_mas.CounterfactualTensors or a tensor directory, got "
                              f"{type(data).__name__}")
        settings["data"] = {"tensors": data, "n_train": 2, "n_valid": 1}
        settings["variables"] = [data.variable]
    config = from_dict(MASConfig, settings)
    problems = _weights_problems(run_path, config, manifest, fingerprint)
    if problems:
        raise ConfigError(["refused: the alignments were trained on other weights"] + problems)
    problem = build_problem(config, log=lambda s: None)
    split = "valid"
    if data is not None:
        split = problem.add_split("all", torch.arange(len(data)))
    alignments = build_alignments(config, problem, init=False)   # the trained tensors are loaded next
    state = load_file(str(run_path / "alignments.safetensors"), device=str(config.device))
    own = {f"model{i}.{k}" for i, a in enumerate(alignments) for k in a.state_dict()}
    if set(state) != own:
        raise DataError(f"{run_path / 'alignments.safetensors'}: its tensors {sorted(set(state) ^ own)[:6]} do not "
                        "fit this run's alignments (k, variables, intervention or alignment kind differ)")
    try:
        for i, a in enumerate(alignments):
            a.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == f"model{i}"})
    except RuntimeError as e:
        raise DataError(f"{run_path / 'alignments.safetensors'} does not fit the models' latent widths: {e}") from None
    with torch.no_grad():
        records = problem.evaluate([a.materialize() for a in alignments], split=split, with_ci=with_ci)
    log(f"evaluated {run_path.name}: {len(records)} directions on {split} rows (no training)")
    return MASResult(models=[m.name for m in problem.models], variables=problem.all_variables, records=records,
                     run_dir=None, info={"evaluated": str(run_path), "split": split})
