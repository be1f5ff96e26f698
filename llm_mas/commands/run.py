"""`llm-mas mas PRESET|CONFIG.yaml key.sub=value ...`, `llm-mas list-presets` and `llm-mas demo`."""

from __future__ import annotations

import typer

from . import run_command


def mas(config: str = typer.Argument(..., help="A shipped preset name (see `llm-mas list-presets`) or a YAML file."),
        overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=2e-3 k=16"),
        threads: int = typer.Option(1, help="torch CPU threads (small models run fastest on 1, and several "
                                             "threads oversubscribe a shared machine badly)."),
        ) -> None:
    """Train MAS alignments between the configured models and write runs/<name>/."""

    def body():
        import torch

        from ..presets import resolve_preset
        from ..run import run
        from ..run_config import load_mas_config

        torch.set_num_threads(max(1, threads))
        cfg = load_mas_config(resolve_preset(config), overrides or [])
        result = run(cfg)
        for var in result.variables:
            typer.echo(f"\ntrial IIA ({var}), rows = source, columns = target:\n{result.table(var)}")
        typer.echo(f"\nwrote {result.run_dir}/")

    run_command(body)


def list_presets() -> None:
    """The shipped presets of `llm-mas mas` and `llm-mas similarity`: name, command, description."""

    def body() -> None:
        from ..presets import list_presets as names
        from ..presets import preset_command, preset_summary, presets_dir

        rows = [(name, preset_command(name), preset_summary(name)[1]) for name in names()]
        width = max(len(name) for name, _, _ in rows)
        for name, command, description in rows:
            typer.echo(f"{name.ljust(width)}  {command.ljust(18)}  {description}")
        typer.echo(f"(run one by name, e.g. `llm-mas mas gru_gru_hidden train.lr=2e-3`; "
                   f"`llm-mas mas PATH.yaml` for your own; the files are in {presets_dir()})")

    run_command(body)


def demo(out_dir: str = typer.Option("runs", help="Where run directories go."),
         quick: bool = typer.Option(False, help="A much smaller run (seconds) to check the installation."),
         threads: int = typer.Option(1, help="torch CPU threads (the task models are small: 1 is fastest)."),
         ) -> None:
    """MAS between two shipped MultiObject GRU seeds, and between a GRU and a Transformer (≈ minutes on CPU)."""

    def body():
        import torch

        from ..demo import run_demo

        torch.set_num_threads(max(1, threads))
        run_demo(out_dir=out_dir, quick=quick)

    run_command(body)
