"""The command line every comparison recipe shares (``recipe_main``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llm_mas.config import load_config, save_config
from llm_mas.errors import ConfigError, MASError

from .plans import REPO, PlannedRun, execute_plan


def recipe_main(argv: Sequence[str] | None, *, name: str, doc: str, config_cls: type,
                build: Callable[[Any, Path, bool, Path | None], list[PlannedRun]],
                write: Callable[[Any, list[PlannedRun], dict, Path, str, float, bool], None],
                outputs: str) -> int:
    """The command line of recipe `name` (module ``recipes.<name>``, preset ``recipes/configs/<name>.yaml``).

    ``python -m recipes.<name> [CONFIG] [key=value ...] [--smoke] [--models-from-scratch] [--only a,b]
    [--report]``: loads the recipe config (`config_cls`, every problem at once), makes
    ``<out_dir>/<name>[-smoke]``, asks ``build(config, run_dir, smoke, scratch_dir)`` for the runs, executes
    them (reusing / resuming) and calls ``write(config, plans, outcomes, run_dir, command, seconds, smoke)``
    after every run. Exit 0 when every selected run finished, 1 when one failed, 2 on a configuration error.
    Changes no global state (the recipe's ``main`` sets thread counts).
    """
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{name}", description=doc.split("\n")[0])
    default_config = str(REPO / "recipes" / "configs" / f"{name}.yaml")
    parser.add_argument("config", nargs="?", default=default_config)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe config")
    parser.add_argument("--smoke", action="store_true",
                        help="2 training steps, tiny data, run dir <name>-smoke")
    parser.add_argument("--models-from-scratch", action="store_true",
                        help="random-weight checkpoints of the same architectures instead of the models")
    parser.add_argument("--only", default="", help="comma list of run names to train (others are only reused "
                                                   "when finished)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: rewrite the table, plot and summary from the finished runs")
    args = parser.parse_intermixed_args(argv)
    if args.report and args.only:
        parser.error("--report trains nothing; drop --only")
    if args.config and "=" in args.config and not Path(args.config).exists():  # an override, default config
        args.overrides.insert(0, args.config)
        args.config = default_config

    t0 = time.perf_counter()
    command = f"python -m recipes.{name} " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(config_cls, args.config, args.overrides)
        run_dir = Path(config.out_dir) / (config.name + ("-smoke" if args.smoke else ""))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml", header=command)
        scratch = run_dir / "scratch_models" if args.models_from_scratch else None
        plans = build(config, run_dir, args.smoke, scratch)
        only = [s for s in args.only.split(",") if s]
        unknown = [s for s in only if s not in {p.name for p in plans}]
        if unknown:
            raise ConfigError(f"--only: unknown runs {unknown}; valid: {', '.join(p.name for p in plans)}")
        print(f"{len(plans)} MAS runs into {run_dir}/mas", flush=True)

        def refresh(outcomes):
            write(config, plans, outcomes, run_dir, command, time.perf_counter() - t0, args.smoke)

        selected = (lambda p: False) if args.report else (lambda p: p.name in only) if only else None
        outcomes = execute_plan(plans, config.reuse_dirs, after_each=refresh, selected=selected)
        refresh(outcomes)
    except MASError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [o.name for o in outcomes.values() if o.status == "failed"]
    print(f"wrote {run_dir}/{outputs} ({time.perf_counter() - t0:.0f}s)"
          + (f"; FAILED runs: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
