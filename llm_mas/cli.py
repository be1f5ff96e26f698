"""The `llm-mas` command line. Each command lives in a small module under ``llm_mas/commands/`` that
imports only the standard library and typer at module level (heavy imports happen inside the command),
so ``llm-mas --help`` answers fast."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="llm-mas",
    help="Model Alignment Search: do two neural networks perform a task the same way?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 1]" or "[lo, hi]" must not be read as markup
)

# command name -> "module:function" (module under llm_mas.commands)
COMMANDS: dict[str, str] = {
    "train-model": "models:train_model",
    "eval-model": "models:eval_model",
    "list-models": "models:list_models",
    "mas": "run:mas",
    "list-presets": "run:list_presets",
    "demo": "run:demo",
    "finetune": "toxicity:finetune",
    "record": "llm:record",
    "train-lm": "llm:train_lm",
    "similarity": "similarity:similarity",
    "evaluate": "evaluate:evaluate",
}


def _register() -> None:
    for name, target in COMMANDS.items():
        module_name, func_name = target.split(":")
        module = importlib.import_module(f"llm_mas.commands.{module_name}")
        app.command(name)(getattr(module, func_name))


_register()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
