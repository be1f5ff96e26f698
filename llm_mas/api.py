"""Python API for notebooks.

    import llm_mas
    res = llm_mas.compare(models=["multiobject-gru-s0", "multiobject-gru-s1"], site="hidden", k=32,
                          variables=["full"], train={"max_epochs": 20})
    res.matrix()          # (n, n) trial IIA, rows = source, columns = target
    res.to_dataframe()    # one row per (source, target, variable) with CIs
    res.plot()

Any torch modules, on counterfactual tensors (`llm_mas.CounterfactualTensors`):

    res = llm_mas.compare(models=[gru_a, gru_b], data=cf, site="rnn", k=8, names=["gru-a", "gru-b"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import apply_overrides, from_dict
from .errors import ConfigError, MASError


def compare(models: Sequence[Any], site: str | Sequence[str] = "hidden", task: str | None = None,
            k: int | None = None, variables: Sequence[str] | None = None, stepwise: bool = False,
            alignment: str = "orthogonal", name: str | None = None, out_dir: str = "runs",
            overrides: Sequence[str] = (), data: Any = None, names: Sequence[str] | None = None,
            standardize: bool = False, alignment_init: str | Path | Sequence[str | Path | None] | None = None,
            **config):
    """Run MAS between `models` and return a `MASResult`.

    models: shipped task-model names or checkpoint directories, ``torch.nn.Module`` objects (any module;
            ``kind: module``, frozen for the run: eval mode, no gradients), `llm_mas.RecordedSystem`
            recordings (``kind: recorded``; name them in ``cl={"inaccessible": [i]}``), or model-entry mappings
            (e.g. ``{"kind": "hf", "name": "gpt2"}``); kinds may be mixed on counterfactual tensors.
    data: `llm_mas.CounterfactualTensors` (what module models run on), or a mapping of ``data`` settings
          (n_train, n_valid, dataset, task, ...).
    site: one site for every model or one per model ("embeddings", "hidden", "layer{l}", a module path or
          a HookPoint's path; at an nn.RNN/GRU/LSTM: its state at each step).
    names: display names of the models (default: the checkpoint's name, the module's class name).
    standardize: z-score every model's latents (per feature, training statistics) inside its alignment
          (``models.i.standardize``; an entry mapping's own key wins). Use it when the models' latents differ
          in scale or offset (different architectures, an LSTM's cell state): an orthogonal map cannot
          rescale, and the run's log names the models when their scales differ more than 2x.
    alignment_init: start the alignments from a finished run's trained ones instead of random rotations: its
          directory (each model starts from that run's model of the same name) or one entry per model
          (a directory, ``DIR#j`` for that run's model j, or None for a random start); ``models.i.alignment_init``,
          an entry mapping's own key wins. E.g. each model's run alone before a joint run.
    task: optional check that every model was trained on this task.
    config: further `MASConfig` fields as keyword arguments (data=..., train=..., directions=..., seed=...).
    overrides: ``key.sub=value`` strings applied last (same syntax as the CLI).
    name: the run directory's name under `out_dir`; by default ``compare-<models>-<hash>`` with a short hash
          of everything that determines the result, so different arguments never share a directory.
    """
    from torch import nn

    from .recordings import RecordedSystem
    from .run import fingerprint_hash, run
    from .run_config import MASConfig, check_models
    from .tasks.tensor_data import CounterfactualTensors

    models = list(models)
    sites = [site] * len(models) if isinstance(site, str) else list(site)
    if len(sites) != len(models):
        raise ConfigError(f"site: got {len(sites)} sites for {len(models)} models; give one or one per model")
    if names is not None and len(names) != len(models):
        raise ConfigError(f"names: got {len(names)} names for {len(models)} models; give one per model")
    entries = []
    if alignment_init is None or isinstance(alignment_init, (str, Path)):
        starts = [alignment_init] * len(models)
    else:
        starts = list(alignment_init)
        if len(starts) != len(models):
            raise ConfigError(f"alignment_init: got {len(starts)} entries for {len(models)} models; give one run "
                              "directory for all or one entry (a directory or None) per model")
    for i, (m, s) in enumerate(zip(models, sites)):
        if isinstance(m, nn.Module):
            entry = {"kind": "module", "name": type(m).__name__, "module": m}
        elif isinstance(m, RecordedSystem):
            entry = {"kind": "recorded", "name": m.name, "recording": m, "site": "latents"}
        elif isinstance(m, dict):
            entry = dict(m)
        elif isinstance(m, str):
            entry = {"name": m}
        else:
            raise ConfigError(f"models[{i}]: expected a model name, a torch.nn.Module or a model-entry mapping, got "
                              f"{type(m).__name__}")
        entry.setdefault("site", s)
        entry.setdefault("alignment", alignment)
        entry.setdefault("standardize", standardize)
        if starts[i] is not None:
            entry.setdefault("alignment_init", str(starts[i]))
        if names is not None:
            entry["name"] = names[i]
        entries.append(entry)
    if isinstance(data, CounterfactualTensors):
        data_settings = {"tensors": data}
        variables = [data.variable] if variables is None else variables
    elif data is None or isinstance(data, dict):
        data_settings = dict(data or {})
        if isinstance(data_settings.get("tensors"), CounterfactualTensors) and variables is None:
            variables = [data_settings["tensors"].variable]
    else:
        raise ConfigError(f"data: expected llm_mas.CounterfactualTensors or a mapping of data settings, got "
                          f"{type(data).__name__}")
    settings = {
        "name": name or "compare-" + "-".join(str(e["name"]).split("/")[-1] for e in entries),
        "models": entries,
        "k": k, "variables": list(variables if variables is not None else ("full",)), "out_dir": out_dir,
        **config,
    }
    settings["data"] = {**data_settings, "stepwise": stepwise}
    cfg = from_dict(MASConfig, apply_overrides(settings, overrides))
    if name is None and not any(o.split("=", 1)[0].strip() == "name" for o in overrides):
        # two calls whose arguments change the result never share (and never resume) one directory
        try:
            cfg.name = f"{cfg.name}-{fingerprint_hash(cfg)}"
        except MASError:
            pass  # run() reports what is wrong with the config
    if task is not None:
        if cfg.kind != "task":
            raise ConfigError(f"task={task!r} checks the training task of a run of task models alone; this run is "
                              f"a {cfg.kind!r} run: leave task unset")
        infos = check_models(cfg)
        wrong = [f"{m.name} ({i['task']})" for m, i in zip(cfg.models, infos) if i["task"] != task]
        if wrong:
            raise ConfigError(f"task={task!r} but these models were trained on another task: {', '.join(wrong)}")
    return run(cfg)
