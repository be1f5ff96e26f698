"""Python API for notebooks.

    import llm_mas
    res = llm_mas.compare(models=["multiobject-gru-s0", "multiobject-gru-s1"], site="hidden", k=32,
                          variables=["full"], train={"max_epochs": 20})
    res.matrix()          # (n, n) trial IIA, rows = source, columns = target
    res.to_dataframe()    # one row per (source, target, variable) with CIs
    res.plot()
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import apply_overrides, from_dict
from .errors import ConfigError, MASError


def compare(models: Sequence[str], site: str | Sequence[str] = "hidden", task: str | None = None,
            k: int | None = None, variables: Sequence[str] = ("full",), stepwise: bool = False,
            alignment: str = "orthogonal", name: str | None = None, out_dir: str = "runs",
            overrides: Sequence[str] = (), **config):
    """Run MAS between `models` (shipped names or checkpoint directories) and return a `MASResult`.

    site: one site for every model or one per model ("embeddings", "hidden", "layer{l}", a hook path).
    task: optional check that every model was trained on this task.
    config: further `MASConfig` fields as keyword arguments (data=..., train=..., directions=..., seed=...).
    overrides: ``key.sub=value`` strings applied last (same syntax as the CLI).
    name: the run directory's name under `out_dir`; by default ``compare-<models>-<hash>`` with a short hash
          of everything that determines the result, so different arguments never share a directory.
    """
    from .run import fingerprint_hash, run
    from .run_config import MASConfig, check_models

    sites = [site] * len(models) if isinstance(site, str) else list(site)
    if len(sites) != len(models):
        raise ConfigError(f"site: got {len(sites)} sites for {len(models)} models; give one or one per model")
    data = {
        "name": name or "compare-" + "-".join(m.split("/")[-1] for m in models),
        "models": [{"name": m, "site": s, "alignment": alignment} for m, s in zip(models, sites)],
        "k": k, "variables": list(variables), "out_dir": out_dir,
        **config,
    }
    data.setdefault("data", {})
    data["data"] = {**data["data"], "stepwise": stepwise}
    cfg = from_dict(MASConfig, apply_overrides(data, overrides))
    if name is None and not any(o.split("=", 1)[0].strip() == "name" for o in overrides):
        # two calls whose arguments change the result never share (and never resume) one directory
        try:
            cfg.name = f"{cfg.name}-{fingerprint_hash(cfg)}"
        except MASError:
            pass  # run() reports what is wrong with the config
    if task is not None:
        infos = check_models(cfg)
        wrong = [f"{m.name} ({i['task']})" for m, i in zip(cfg.models, infos) if i["task"] != task]
        if wrong:
            raise ConfigError(f"task={task!r} but these models were trained on another task: {', '.join(wrong)}")
    return run(cfg)
