"""CLI command modules: standard library + typer at import time only (keeps `llm-mas --help` fast).

Every command turns an ``llm_mas.errors.MASError`` into one clear message and exit code 2 via
``run_command``; so is a missing optional LLM dependency (``pip install 'llm_mas[llm]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Top-level modules of the [llm] extra (Hugging Face models); the core install has none of them.
LLM_EXTRA_MODULES = ("transformers", "nnsight", "transformer_lens", "peft", "accelerate", "datasets",
                     "tokenizers", "huggingface_hub")


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; a MASError becomes one red line on stderr and exit status 2."""
    import typer

    from ..errors import MASError

    try:
        return fn()
    except MASError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in LLM_EXTRA_MODULES:
            raise
        typer.secho(f"error: this command needs {missing!r}, one of the optional LLM dependencies; install them "
                    "with: pip install 'llm_mas[llm]'", fg=typer.colors.RED, err=True)
        sys.exit(2)
