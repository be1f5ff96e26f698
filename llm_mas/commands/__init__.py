"""CLI command modules: standard library + typer at import time only (keeps `llm-mas --help` fast).

Every command turns an ``llm_mas.errors.MASError`` into one clear message and exit code 2 via
``run_command``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; a MASError becomes one red line on stderr and exit status 2."""
    import typer

    from ..errors import MASError

    try:
        return fn()
    except MASError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
