"""`llm-mas mas CONFIG.yaml key.sub=value ...` and `llm-mas demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from . import run_command


def mas(config: Path = typer.Argument(..., help="A preset YAML (see recipes/configs/)."),
        overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=2e-3 k=16"),
        threads: int = typer.Option(1, help="torch CPU threads (small models run fastest on 1, and several "
                                             "threads oversubscribe a shared machine badly)."),
        ) -> None:
    """Train MAS alignments between the configured models and write runs/<name>/."""

    def body():
        import torch

        from ..run import run
        from ..run_config import load_mas_config

        torch.set_num_threads(max(1, threads))
        cfg = load_mas_config(config, overrides or [])
        result = run(cfg)
        for var in result.variables:
            typer.echo(f"\ntrial IIA ({var}), rows = source, columns = target:\n{result.table(var)}")
        typer.echo(f"\nwrote {result.run_dir}/")

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
