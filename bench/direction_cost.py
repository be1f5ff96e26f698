"""The cost of a direction versus the number of models n, with every direction trained every step.

    python bench/direction_cost.py                         # n = 2 3 5 9 15, 1 and 2 threads
    python bench/direction_cost.py --n 9 --threads 1 --profile   # + torch.profiler table of one step
    python bench/direction_cost.py --quick                 # n = 2 3, 1 thread, few steps (smoke test)
    python bench/direction_cost.py --steps 4 --budget-min 40   # bounded: no new point after 40 min
    python bench/direction_cost.py --n 15 --threads 1 --transformer-site layer0 --ab   # layer0, on/off in one process

From n = 9 on (``--cut-threads-from``) a 2-thread point is skipped once a smaller n measured 2 threads slower
than 1 by ``--cut-factor`` (1.5) in wall time; skipped points are listed with the reason.

The models are the shipped MultiObject models interleaved by architecture (gru-s0, lstm-s0,
transformer-s0, gru-s1, ...; the first n are used), each at its hidden site, variable ``full``, k = 32,
orthogonal alignments, all n² directions trained every step (no direction budget), batch 128. A step is
the `MASTrainer` step: materialize, loss, backward, Adam. Each point (n, threads) is one fresh
subprocess, so its peak RSS (``llm_mas.resources.peak_resident_mib``) is its own; it reports the median
wall and process-CPU time of a step after 2 warm-up steps, and that divided by n² (the cost of a
direction). ``--exact`` runs the same points with the frozen-prefix shortcuts switched off
(``TaskModelProblem.skip_frozen = False``: every target recomputed from its input tokens, as before), so
before/after come from the same script on the same machine. With the shortcuts on, the constant head
verdicts of every training pair are filled before the timed steps (``precompute_frozen``; a run fills them
lazily during its first epoch) and that one-off cost is reported as ``prefill``. ``--transformer-site layer0``
puts the Transformers at their first block's output (the RNNs stay at hidden); ``--ab`` then times, in the
same process, the directions into Transformers and the others with the shortcuts on and off alternately.
Results: bench/results/direction_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine_info, markdown_table, median, print_table, write_result

HERE = Path(__file__).resolve().parent
ORDER = [f"multiobject-{arch}-s{seed}" for seed in range(5) for arch in ("gru", "lstm", "transformer")]


def ab_rounds(problem, trainer, rounds: int) -> dict:
    """Same process, before/after by flag: per round, the loss + backward of the directions into Transformers
    and of the others, each timed (process CPU) with the shortcuts on and off, alternately. No optimizer
    step (the cost does not depend on the alignments' values); the two paths' losses are compared."""
    import time

    transformer = {t for t, m in enumerate(problem.models) if m.model.arch == "transformer"}
    groups = {"into_transformers": [d for d in problem.directions if d[1] in transformer],
              "others": [d for d in problem.directions if d[1] not in transformer]}
    cpu = {(g, flag): [] for g in groups for flag in (True, False)}
    rel = []
    for r in range(rounds + 1):                       # round 0: warm-up of the exact path, not timed
        rows, maps = trainer._batch(r), None
        for group, directions in groups.items():
            if not directions:
                continue
            losses = {}
            for flag in (True, False):
                problem.skip_frozen = flag
                trainer.optimizer.zero_grad(set_to_none=True)
                c0 = time.process_time()
                maps = trainer.materialize()
                loss, _ = problem.loss(maps, rows, directions=directions)
                loss.backward()
                if r:
                    cpu[(group, flag)].append(time.process_time() - c0)
                losses[flag] = float(loss.detach())
            rel.append(abs(losses[True] - losses[False]) / abs(losses[False]))
    problem.skip_frozen = True
    out = {"loss_rel_diff_max": max(rel)}
    for group, directions in groups.items():
        out[group] = {"directions": len(directions)}
        for flag, name in ((True, "skip_frozen"), (False, "exact")):
            if directions:
                out[group][f"{name}_cpu_ms_per_direction"] = 1e3 * median(cpu[(group, flag)]) / len(directions)
    return out


def child(n: int, threads: int, batch: int, steps: int, n_train: int, skip_frozen: bool, profile: bool,
          transformer_site: str = "hidden", ab: bool = False, models: list[str] | None = None) -> dict:
    """One measurement in this (fresh) process; returns the JSON-able result."""
    names = models or ORDER[:n]
    import torch

    torch.set_num_threads(threads)
    from llm_mas.config import to_dict
    from llm_mas.resources import peak_resident_mib, resident_mib
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import config_from_kwargs
    from llm_mas.trainer import MASTrainer, TrainerConfig

    config = config_from_kwargs(
        models=[{"name": name, "site": transformer_site if "transformer" in name else "hidden"} for name in names],
        variables=["full"], k=32,
        directions="all", data={"n_train": n_train, "n_valid": 100}, progress=False,
        train={"batch_size": batch})
    after_imports = resident_mib()
    t0 = time.perf_counter()
    problem = build_problem(config)
    build_s = time.perf_counter() - t0
    problem.skip_frozen = skip_frozen
    # the head's constant verdicts on the pairs (last-layer Transformer sites) are filled lazily, once per
    # pair, during a run's first epoch; filled here so the timed steps are the steady state (cost reported)
    t0, c0 = time.perf_counter(), time.process_time()
    problem.precompute_frozen("train")
    prefill = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    alignments = build_alignments(config, problem)
    trainer = MASTrainer(alignments, problem, TrainerConfig(**{**to_dict(config.train), "seed": 0}),
                         progress=False)
    wall, cpu, losses = [], [], []

    def one_step() -> None:
        losses.append(trainer.train_step().loss)

    for step in range(steps + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        one_step()
        if step >= 2:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                one_step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    d = n * n
    ab_result = None
    if ab:
        peak_before_ab = peak_resident_mib()
        ab_result = {"peak_rss_before_mib": peak_before_ab, **ab_rounds(problem, trainer, steps)}
    return {"n": n, "threads": threads, "skip_frozen": skip_frozen, "models": names, "directions": d,
            "transformer_site": transformer_site, "ab": ab_result,
            "batch": batch, "n_train": n_train, "steps": steps, "build_s": build_s, "prefill": prefill,
            "step_wall_s": median(wall), "step_cpu_s": median(cpu),
            "direction_wall_ms": 1e3 * median(wall) / d, "direction_cpu_ms": 1e3 * median(cpu) / d,
            "losses": losses, "rss_after_imports_mib": after_imports, "peak_rss_mib": peak_resident_mib(),
            "loadavg": list(os.getloadavg()), "profile": table}


def _skip_reason(runs: list[dict], n: int, threads: int, skip_frozen: bool, args, started: float) -> str | None:
    """Why the point (n, threads) is not measured (time budget spent; more threads already shown slower)."""
    if args.budget_min is not None and time.perf_counter() - started > 60 * args.budget_min:
        return f"time budget of {args.budget_min:g} min spent"
    if threads == 1 or n < args.cut_threads_from:
        return None
    wall = {(r["n"], r["threads"]): r["step_wall_s"] for r in runs if r["skip_frozen"] == skip_frozen}
    for m in sorted({m for m, _ in wall}, reverse=True):
        if m < n and (m, 1) in wall and (m, threads) in wall and wall[m, threads] > args.cut_factor * wall[m, 1]:
            return (f"{threads} threads were {wall[m, threads] / wall[m, 1]:.1f}x slower than 1 in wall time at "
                    f"n={m}")
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=2000,
                        help="pairs per direction (the step's cost does not depend on it; the build does)")
    parser.add_argument("--exact", action="store_true", help="also measure with the frozen-prefix shortcuts off")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of 2 steps")
    parser.add_argument("--transformer-site", default="hidden",
                        help="the Transformers' site (hidden = last layer, layer0, ...); the RNNs stay at hidden")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names instead of the first n of the interleaved order")
    parser.add_argument("--ab", action="store_true",
                        help="after the timed steps, time the directions into Transformers (and the others) with "
                             "the shortcuts on and off alternately in the same process")
    parser.add_argument("--name", default="direction_cost", help="result file name under bench/results")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="stop starting new points after this many minutes (the skipped ones are listed)")
    parser.add_argument("--cut-threads-from", type=int, default=9,
                        help="from this n on, skip the >1-thread points once a smaller n measured them slower "
                             "than 1 thread by --cut-factor in wall time (listed as skipped, with the reason)")
    parser.add_argument("--cut-factor", type=float, default=1.5)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    skipped = []
    ns = args.n or ([2, 3] if args.quick else [2, 3, 5, 9, 15])
    if args.models:
        ns = [len(args.models.split(","))]
    threads = args.threads or ([1] if args.quick else [1, 2])
    steps = args.steps or (3 if args.quick else 8)
    modes = [True, False] if args.exact else [True]
    runs = []
    for n in ns:
        for th in threads:
            for skip in modes:
                why = _skip_reason(runs, n, th, skip, args, started)
                if why:
                    skipped.append({"n": n, "threads": th, "skip_frozen": skip, "why": why})
                    print(f"[direction_cost] n={n} threads={th} skip_frozen={skip}: skipped ({why})", flush=True)
                    continue
                command = [sys.executable, str(HERE / "direction_cost.py"), "--child", str(n), str(th), str(args.batch),
                           str(steps), str(args.n_train), str(int(skip)), str(int(args.profile)),
                           args.transformer_site, str(int(args.ab)), args.models or ""]
                out = subprocess.run(command, capture_output=True, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(th)})
                if out.returncode != 0:
                    raise RuntimeError(f"n={n} threads={th} failed: {out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append(result)
                print(f"[direction_cost] n={n} threads={th} skip_frozen={skip}: step {result['step_cpu_s']:.3f}s CPU / "
                      f"{result['step_wall_s']:.3f}s wall, {result['direction_cpu_ms']:.1f} ms CPU a direction, "
                      f"peak RSS {result['peak_rss_mib']:.0f} MiB, load {result['loadavg'][0]:.1f}", flush=True)
                if result["ab"]:
                    print(f"[direction_cost]   same process: {json.dumps(result['ab'])}", flush=True)
                if result["profile"]:
                    print(result["profile"], flush=True)
                if not args.quick:  # after every point: a long run that is stopped keeps what it measured
                    write_result(args.name, {"machine": machine_info(), "batch": args.batch, "steps": steps,
                                             "n_train": args.n_train, "runs": runs, "skipped": skipped})
    header = ["n", "directions", "threads", "skip frozen", "CPU s/step", "wall s/step", "CPU ms/direction",
              "wall ms/direction", "peak RSS MiB", "load"]
    rows = [[r["n"], r["directions"], r["threads"], r["skip_frozen"], r["step_cpu_s"], r["step_wall_s"],
             r["direction_cpu_ms"], r["direction_wall_ms"], r["peak_rss_mib"], r["loadavg"][0]] for r in runs]
    print_table(f"Every-direction step versus n (batch {args.batch}, {steps} timed steps, n_train {args.n_train})",
                header, rows)
    payload = {"machine": machine_info(), "batch": args.batch, "steps": steps, "n_train": args.n_train,
               "runs": runs, "skipped": skipped, "table_markdown": markdown_table(header, rows)}
    if not args.quick:
        write_result(args.name, payload)
    return payload


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        n, th, batch, steps, n_train, skip, prof = map(int, sys.argv[2:9])
        site, ab = (sys.argv[9], bool(int(sys.argv[10]))) if len(sys.argv) > 10 else ("hidden", False)
        names = sys.argv[11].split(",") if len(sys.argv) > 11 and sys.argv[11] else None
        print(json.dumps(child(n, th, batch, steps, n_train, bool(skip), bool(prof), site, ab, names)))
    else:
        main(sys.argv[1:])
