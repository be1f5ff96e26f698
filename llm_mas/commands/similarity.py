"""`llm-mas similarity PRESET|CONFIG.yaml key.sub=value ...`: RSA and CKA between task models (docs/method.md §13)."""

from __future__ import annotations

import typer

from . import run_command


def similarity(config: str = typer.Argument(..., help="A shipped preset name (similarity_*, see `llm-mas "
                                                       "list-presets`) or a YAML file."),
               overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. n_rows=500 "
                                                               "models.1.site=embeddings"),
               ) -> None:
    """RSA (cosine/euclidean × spearman/pearson) and CKA (biased/unbiased) on the same token sequences;
    writes runs/<name>/{config.yaml, similarity.json} and prints mean ± std over the row subsamples."""

    def body():
        from ..correlative import format_similarity_table, load_similarity_config, run_similarity
        from ..presets import resolve_preset

        cfg = load_similarity_config(resolve_preset(config), overrides or [])
        result = run_similarity(cfg, log=typer.echo)
        typer.echo("\n" + format_similarity_table(result))
        typer.echo(f"\nwrote {result['run_dir']}/")

    run_command(body)
