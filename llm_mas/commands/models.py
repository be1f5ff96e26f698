"""Task-model commands: ``train-model``, ``eval-model``, ``list-models``.

    llm-mas train-model --task multiobject --arch gru --seed 0 --out runs/multiobject-gru-s0
    llm-mas eval-model multiobject-gru-s0 --n-per-count 200
    llm-mas list-models
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from . import run_command


def _canonical_command(pairs: list[tuple[str, object]]) -> str:
    """The command line that reproduces a run (only options that were given)."""
    words = ["llm-mas", "train-model"]
    for flag, value in pairs:
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def train_model(
    task: str = typer.Option("multiobject", help="multiobject | sameobject | singleobject | modulo | rounding | "
                                                 "arithmetic"),
    arch: str = typer.Option("gru", help="gru | lstm | transformer"),
    seed: int = typer.Option(0, help="seed of the weights, the training data and the periodic evaluation"),
    out: Path = typer.Option(None, help="run directory (default: runs/<task>-<arch>-s<seed>); it loads by path. "
                                        "To ship a model from a source checkout: llm_mas/data/models/<name>, then "
                                        "`python -m llm_mas.models.registry` updates the manifest"),
    steps: int = typer.Option(None, help="budget of optimizer steps (default 10000; stops early at the target)"),
    batch_size: int = typer.Option(None, help="sequences per step (default 64)"),
    lr: float = typer.Option(None, help="peak learning rate (default 3e-3 RNNs, 1e-3 Transformer)"),
    dropout: float = typer.Option(None, help="dropout (default: 0.5 in the RNN head, 0 in the Transformer)"),
    eval_every: int = typer.Option(None, help="steps between free-running evaluations (default 250)"),
    threads: int = typer.Option(None, help="torch threads (default: torch's choice)"),
    device: str = typer.Option(None, help="cpu (default) or cuda"),
    set_: list[str] = typer.Option([], "--set", help="any TrainConfig field as key=value, e.g. --set warmup_steps=100"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train a task model from scratch and write config.yaml, model.safetensors and metrics.json."""

    def body() -> None:
        from ..config import apply_overrides, from_dict
        from ..models.training import TrainConfig, train_task_model

        values = {"task": task, "arch": arch, "seed": seed}
        for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr), ("dropout", dropout),
                           ("eval_every", eval_every), ("threads", threads), ("device", device)):
            if value is not None:
                values[key] = value
        values = apply_overrides(values, list(set_))
        cfg = from_dict(TrainConfig, values)
        run_dir = out or Path("runs") / f"{cfg.task}-{cfg.arch}-s{cfg.seed}"
        command = _canonical_command([
            ("--task", task), ("--arch", arch), ("--seed", seed), ("--out", str(run_dir)), ("--steps", steps),
            ("--batch-size", batch_size), ("--lr", lr), ("--dropout", dropout), ("--eval-every", eval_every),
            ("--threads", threads), ("--device", device), ("--set", list(set_) or None)])
        result = train_task_model(cfg, run_dir, command=command, progress=not quiet, log=typer.echo)
        accuracy = result.metrics["accuracy"]
        typer.echo(f"wrote {run_dir}/ (config.yaml, model.safetensors, metrics.json); free-running trial "
                   f"accuracy min over N {accuracy['min']:.4f}, overall {accuracy['overall']:.4f}")
        if not result.metrics["passes_bar"]:
            typer.secho("warning: below the 0.99 bar on some N; do not use this model for MAS",
                        fg=typer.colors.YELLOW, err=True)

    run_command(body)


def eval_model(
    name_or_path: str = typer.Argument(..., help="a shipped model name (see list-models) or a run directory"),
    n_per_count: int = typer.Option(200, help="sequences per N"),
    seed: int = typer.Option(None, help="evaluation seed (default: the one recorded with the model)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Free-running trial accuracy per N (Arithmetic: also per initial-value range) next to the recorded one."""

    def body() -> None:
        import json

        import numpy as np

        from ..errors import ConfigError
        from ..models.registry import resolve_model_dir
        from ..models.training import evaluate, format_table, load_run, make_eval_set
        from ..tasks import get_task

        if n_per_count < 1:
            raise ConfigError(f"--n-per-count {n_per_count} must be at least 1")
        run_dir, _ = resolve_model_dir(name_or_path)
        metrics_path = run_dir / "metrics.json"
        recorded = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
        eval_seed = seed if seed is not None else (recorded["eval_seed"] if recorded else 12345)
        model = load_run(run_dir, device=device)
        task = get_task(model.task_name)
        result = evaluate(model, make_eval_set(task, n_per_count, np.random.default_rng(eval_seed)))
        held_out = set(recorded["held_out"]) if recorded else set()
        rec_acc = recorded["accuracy"] if recorded else {}
        typer.echo(f"{name_or_path}: {model.arch} on {model.task_name}, eval seed {eval_seed}, "
                   f"{n_per_count} sequences per value")
        labels = {"count": "n_ops" if model.task_name == "arithmetic" else "N", "initial_value": "initial value"}
        for group, values in result.groups.items():
            rows = []
            for value, acc in values.items():
                before = rec_acc.get(group, {}).get(str(value))
                mark = "held out" if group == "count" and value in held_out else ""
                rows.append([value, mark, f"{acc:.4f}", "-" if before is None else f"{before:.4f}"])
            typer.echo(format_table([labels.get(group, group), "", "accuracy", "recorded"], rows))
        before = f"{rec_acc['overall']:.4f}" if rec_acc else "-"
        typer.echo(f"overall {result.overall:.4f} (recorded {before}); min {result.min_accuracy:.4f}; "
                   f"token accuracy {result.token_accuracy:.4f}")

    run_command(body)


def list_models() -> None:
    """The shipped task models (manifest.json of llm_mas/data/models, or of $LLM_MAS_MODELS_DIR) as a table."""

    def body() -> None:
        from ..models.registry import models_dir, read_manifest
        from ..models.training import format_table

        models = read_manifest()["models"]
        if not models:
            typer.echo(f"no task models shipped yet in {models_dir()}")
            return
        rows = [[name, e["task"], e["arch"], e["seed"], f"{e['min_accuracy']:.4f}", f"{e['overall_accuracy']:.4f}",
                 "yes" if e["passes_bar"] else "NO", e["steps_run"], f"{e['train_seconds']:.0f}", e["date"]]
                for name, e in models.items()]
        typer.echo(format_table(["name", "task", "arch", "seed", "min acc", "overall", ">=0.99", "steps",
                                 "train s", "date"], rows))
        typer.echo(f"(accuracy: free-running trial accuracy per N in 1..20; load with "
                   f"llm_mas.load_task_model(name); files in {models_dir()})")

    run_command(body)
