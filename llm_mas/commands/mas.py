"""`llm-mas mas CONFIG.yaml key.sub=value ...` and `llm-mas demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from . import run_command


def mas(config: Path = typer.Argument(..., help="A preset YAML (see recipes/configs/)."),
        overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=2e-3 k=16"),
        ) -> None:
    """Train MAS alignments between the configured models and write runs/<name>/."""

    def body():
        from ..mas import load_mas_config, run_mas

        cfg = load_mas_config(config, overrides or [])
        result = run_mas(cfg)
        for var in result.variables:
            typer.echo(f"\ntrial IIA ({var}), rows = source, columns = target:\n{result.table(var)}")
        typer.echo(f"\nwrote {result.run_dir}/")

    run_command(body)


def demo(out_dir: str = typer.Option("runs", help="Where run directories go."),
         quick: bool = typer.Option(False, help="A much smaller run (seconds) to check the installation."),
         ) -> None:
    """MAS between two shipped MultiObject GRU seeds, and between a GRU and a Transformer (≈ minutes on CPU)."""

    def body():
        from ..demo import run_demo

        run_demo(out_dir=out_dir, quick=quick)

    run_command(body)
