"""`llm-mas similarity CONFIG.yaml key.sub=value ...`: RSA and CKA between task models (method.md §9)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import run_command


def similarity(config: Path = typer.Argument(..., help="A preset YAML (see recipes/configs/similarity_*.yaml)."),
               overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. n_rows=500 "
                                                               "models.1.site=embeddings"),
               ) -> None:
    """RSA (cosine/euclidean × spearman/pearson) and CKA (biased/unbiased) on the same token sequences;
    writes runs/<name>/{config.yaml, similarity.json} and prints mean ± std over the row subsamples."""

    def body():
        from ..correlative import format_similarity_table, load_similarity_config, run_similarity

        cfg = load_similarity_config(config, overrides or [])
        result = run_similarity(cfg, log=typer.echo)
        typer.echo("\n" + format_similarity_table(result))
        typer.echo(f"\nwrote {result['run_dir']}/")

    run_command(body)
