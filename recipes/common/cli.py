"""The command line every recipe shares: ``recipe_front_door`` (arguments, presets and overrides, ``--smoke``,
``--only``, ``--report``, the run directory and its ``config.yaml``, exit codes) and ``recipe_main`` (the
front door plus the plan of MAS runs the comparison recipes execute)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mas.config import load_config, save_config
from llm_mas.errors import ConfigError, MASError

from .plans import REPO, PlannedRun, execute_plan


@dataclass
class RecipeInvocation:
    """One call of a recipe, as the front door parsed and prepared it."""

    config: Any                  # the loaded, validated recipe config
    run_dir: Path                # created; holds config.yaml (first line: the command)
    smoke: bool
    only: list[str]              # --only words (empty: everything)
    report: bool                 # --report: run nothing, rewrite the outputs from what is finished
    command: str                 # "python -m recipes.<name> ..." as typed
    args: argparse.Namespace     # every parsed argument, the recipe's own flags included
    started: float               # time.perf_counter() at the start


def recipe_front_door(argv: Sequence[str] | None, *, name: str, doc: str, config_cls: type,
                      run: Callable[[RecipeInvocation], int], default_config: str | None = None,
                      preset: Callable[[str | None, bool], Path] | None = None,
                      run_dir_of: Callable[[Any, bool], Path] | None = None,
                      add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                      smoke_help: str = "tiny settings (seconds)", failure_code: int = 2) -> int:
    """Parse ``python -m recipes.<name> [CONFIG] [key=value ...] [--smoke] [--only a,b] [--report] ...``,
    load the config (every problem at once), make the run directory, save ``config.yaml`` and call
    ``run(invocation)``, whose return value is the exit status.

    default_config: the preset when none is given (default ``recipes/configs/<name>.yaml``).
    preset:         ``(CONFIG or None, smoke) -> path`` where presets have names or smoke twins.
    run_dir_of:     ``(config, smoke) -> directory`` (default ``<out_dir>/<name>[-smoke]``).
    add_arguments:  adds the recipe's own flags.
    A first positional ``key=value`` that is not a file is an override of the default preset. Exit status 2 on
    a configuration error (``ConfigError``), `failure_code` on any other ``MASError`` raised by `run`.
    """
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{name}", description=doc.split("\n")[0])
    default_config = default_config or str(REPO / "recipes" / "configs" / f"{name}.yaml")
    parser.add_argument("config", nargs="?", default=None if preset else default_config)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe config")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--only", default="", help="comma list of the runs (stages) to run; the others are only "
                                                   "reused when finished")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: rewrite the outputs from the finished runs")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if args.report and args.only:
        parser.error("--report trains nothing; drop --only")
    if args.config and "=" in args.config and not Path(args.config).exists():  # an override, default config
        args.overrides.insert(0, args.config)
        args.config = None if preset else default_config

    started = time.perf_counter()
    command = f"python -m recipes.{name} " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        stray = [w for w in args.overrides if "=" not in w]
        if args.only and stray:  # `--only a b`: the words after the first are positional overrides
            raise ConfigError(f"--only takes one comma list of runs, got --only {args.only} followed by "
                              f"{' '.join(stray)} (read as overrides); write --only {','.join([args.only, *stray])}")
        path = preset(args.config, args.smoke) if preset else args.config
        config = load_config(config_cls, path, args.overrides)
        run_dir = (run_dir_of(config, args.smoke) if run_dir_of
                   else Path(config.out_dir) / (config.name + ("-smoke" if args.smoke else "")))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml", header=command)
        return run(RecipeInvocation(config=config, run_dir=run_dir, smoke=args.smoke,
                                    only=[s for s in args.only.split(",") if s], report=args.report,
                                    command=command, args=args, started=started))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MASError as e:
        print(f"error: {e}", file=sys.stderr)
        return failure_code


def recipe_main(argv: Sequence[str] | None, *, name: str, doc: str, config_cls: type,
                build: Callable[[Any, Path, bool, Path | None], list[PlannedRun]],
                write: Callable[[Any, list[PlannedRun], dict, Path, str, float, bool], None],
                outputs: str) -> int:
    """The command line of recipe `name` (module ``recipes.<name>``, preset ``recipes/configs/<name>.yaml``).

    ``python -m recipes.<name> [CONFIG] [key=value ...] [--smoke] [--models-from-scratch] [--only a,b]
    [--report]``: ``recipe_front_door`` loads the recipe config (`config_cls`, every problem at once) and
    makes ``<out_dir>/<name>[-smoke]``; ``build(config, run_dir, smoke, scratch_dir)`` gives the runs, which
    are executed (reusing / resuming), and ``write(config, plans, outcomes, run_dir, command, seconds, smoke)``
    is called after every run. Exit 0 when every selected run finished, 1 when one failed, 2 on a
    configuration error. Changes no global state (the recipe's ``main`` sets thread counts).
    """
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--models-from-scratch", action="store_true",
                            help="random-weight checkpoints of the same architectures instead of the models")

    def run(call: RecipeInvocation) -> int:
        config, run_dir = call.config, call.run_dir
        scratch = run_dir / "scratch_models" if call.args.models_from_scratch else None
        plans = build(config, run_dir, call.smoke, scratch)
        unknown = [s for s in call.only if s not in {p.name for p in plans}]
        if unknown:
            raise ConfigError(f"--only: unknown runs {unknown}; valid: {', '.join(p.name for p in plans)}")
        print(f"{len(plans)} MAS runs into {run_dir}/mas", flush=True)

        def refresh(outcomes):
            write(config, plans, outcomes, run_dir, call.command, time.perf_counter() - call.started, call.smoke)

        only = call.only
        selected = (lambda p: False) if call.report else (lambda p: p.name in only) if only else None
        outcomes = execute_plan(plans, config.reuse_dirs, after_each=refresh, selected=selected)
        refresh(outcomes)
        failed = [o.name for o in outcomes.values() if o.status == "failed"]
        print(f"wrote {run_dir}/{outputs} ({time.perf_counter() - call.started:.0f}s)"
              + (f"; FAILED runs: {', '.join(failed)}" if failed else ""), flush=True)
        return 1 if failed else 0

    return recipe_front_door(argv, name=name, doc=doc, config_cls=config_cls, run=run,
                             add_arguments=add_arguments, smoke_help="2 training steps, tiny data, run dir "
                                                                     "<name>-smoke")
