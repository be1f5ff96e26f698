"""`llm-mas evaluate RUN --data DIR ...`: score a finished run's alignments on new counterfactual data (no
training; `llm_mas.artifacts`)."""

from __future__ import annotations

import typer

from . import run_command


def _indexed(items: list[str], option: str) -> dict[int, str]:
    from ..errors import ConfigError

    out = {}
    for item in items:
        index, sep, value = item.partition("=")
        if not sep or not index.strip().isdigit() or not value:
            raise ConfigError(f"{option} {item!r}: expected INDEX=VALUE, e.g. {option} 0=my_pkg.nets:load_gru")
        out[int(index)] = value
    return out


def evaluate(run: str = typer.Argument(..., help="A finished run directory (config.yaml, fingerprint.json, "
                                               "alignments.safetensors)."),
             data: str = typer.Option(None, "--data", help="A tensor directory (CounterfactualTensors.save); "
                                                           "default: the run's own data settings."),
             factory: list[str] = typer.Option(None, "--factory", help="INDEX=package.module:function: the factory "
                                               "that builds model INDEX (module kinds; never read from the run)."),
             weights: list[str] = typer.Option(None, "--weights", help="INDEX=FILE: a state_dict file loaded into "
                                               "the module --factory INDEX builds."),
             seed: int = typer.Option(None, "--seed", help="Seed of new pairs (runs on built-in tasks)."),
             device: str = typer.Option(None, "--device", help="cpu or cuda[:i] (default: the run's)."),
             out: str = typer.Option(None, "--out", help="Write the records (results.json form) to this file."),
             ) -> None:
    """Load the run's alignments, check every model's weights against its fingerprint, and score every
    direction on the data with 95% CIs. Task, HF and recorded models are reloaded from the run's config;
    module models need --factory (a run's config.yaml is never imported)."""

    def body():
        from ..artifacts import evaluate as evaluate_run
        from ..config import load_yaml
        from ..errors import ConfigError
        from ..files import atomic_write_json
        from ..models.modules import build_module, read_weights

        factories, files = _indexed(factory or [], "--factory"), _indexed(weights or [], "--weights")
        n = len(load_yaml(f"{run}/config.yaml").get("models") or []) if (factories or files) else 0
        bad = sorted(i for i in set(factories) | set(files) if i >= n or i not in factories)
        if bad:
            raise ConfigError(f"--factory/--weights name model(s) {bad}: the run has models 0..{n - 1}, and "
                              "--weights INDEX needs --factory INDEX")
        models = None
        if factories:
            models = [None] * n
            for i, path in factories.items():
                module = build_module(path, {}, f"--factory {i}")
                if i in files:
                    try:
                        module.load_state_dict(read_weights(files[i], f"--weights {i}"))
                    except RuntimeError as e:   # torch's report of missing / unexpected / misshapen tensors
                        raise ConfigError(f"--weights {i}: {files[i]!r} does not fit --factory {i} {path}: "
                                          f"{str(e).splitlines()[0]}") from None
                models[i] = module
        result = evaluate_run(run, models=models, data=data, seed=seed, device=device, log=typer.echo)
        typer.echo(result.table())
        if out:
            atomic_write_json(out, [r.to_dict() for r in result.records], indent=1, sort_keys=True)
            typer.echo(f"wrote {out}")

    run_command(body)
