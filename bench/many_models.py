"""Many models in one run: training-step time and peak memory versus the number of models n, at a fixed
budget of directions per step.

    python bench/many_models.py                          # n = 2 3 5 9 15, n_train 10 000, 8 directions per step
    python bench/many_models.py --quick                  # n = 2 3 5, small data (smoke test)
    python bench/many_models.py --n 2 15 --n-train 2000 --n-valid 200 --repeats 2

The models are the 15 shipped MultiObject models, interleaved by architecture (gru-s0, lstm-s0,
transformer-s0, gru-s1, ...; the first n are used), each at its hidden site, variable ``full``, k = 32,
orthogonal alignments, every direction trained (n² of them) and ``train.directions_per_step`` = the
budget (each sampling of ``--sampling``: balanced spreads a step's directions over many targets,
by_target groups them by target). Each measurement is one fresh subprocess (so its peak RSS, read with
``getrusage(RUSAGE_SELF).ru_maxrss``, is its own): it builds the problem (sampling, latent caches, pairs),
runs `--steps` training steps (the MASTrainer loop body with the step's sampled directions) after 2
warm-up steps, and reports the median step time (wall and process CPU), the peak RSS after building and
after the steps, and the bytes held by the problem's tensors (per-model latent caches; per-direction
arrays). Repeats alternate over n (rounds in a rotating order). Results: bench/results/many_models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import markdown_table, median, print_table, write_result

from llm_mas.resources import peak_resident_mib, resident_mib

HERE = Path(__file__).resolve().parent
ORDER = [f"multiobject-{arch}-s{seed}" for seed in range(5) for arch in ("gru", "lstm", "transformer")]


def _rss_now_mib() -> float:
    return resident_mib()


def _peak_mib() -> float:
    return peak_resident_mib()


def child(n: int, n_train: int, n_valid: int, budget: int, batch: int, steps: int, sampling: str) -> dict:
    """One measurement in this (fresh) process; returns the JSON-able result."""
    import torch

    torch.set_num_threads(1)
    from llm_mas.config import to_dict
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import config_from_kwargs
    from llm_mas.trainer import MASTrainer, TrainerConfig

    config = config_from_kwargs(
        models=[{"name": name, "site": "hidden"} for name in ORDER[:n]], variables=["full"], k=32,
        directions="all", data={"n_train": n_train, "n_valid": n_valid}, progress=False,
        train={"batch_size": batch, "directions_per_step": budget, "direction_sampling": sampling})
    after_imports = _rss_now_mib()
    t0 = time.perf_counter()
    problem = build_problem(config)
    build_s = time.perf_counter() - t0
    peak_build = _peak_mib()
    caches = sum(c.nbytes for split in problem.caches.values() for c in split)
    directions = sum(c.nbytes for split in problem.splits.values() for c in split)
    alignments = build_alignments(config, problem)
    trainer = MASTrainer(alignments, problem, TrainerConfig(**{**to_dict(config.train), "seed": 0}),
                         progress=False)
    wall, cpu = [], []
    for step in range(steps + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        rows, chosen = trainer._batch(step), trainer.step_directions(step)
        trainer.optimizer.zero_grad(set_to_none=True)
        budgeted = {} if chosen is None else {"directions": chosen}
        loss, _ = problem.loss(trainer._step_maps(chosen), rows, **budgeted)
        loss.backward()
        trainer.optimizer.step()
        if step >= 2:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"n": n, "models": ORDER[:n], "directions": n * n, "budget": budget, "sampling": sampling, "batch": batch,
            "n_train": n_train, "n_valid": n_valid, "steps": steps, "build_s": build_s,
            "step_wall_s": median(wall), "step_cpu_s": median(cpu), "rss_after_imports_mib": after_imports,
            "peak_rss_after_build_mib": peak_build, "peak_rss_mib": _peak_mib(),
            "cache_mib": caches / 2**20, "direction_arrays_mib": directions / 2**20,
            "loadavg": list(os.getloadavg())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, nargs="+", default=None)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-valid", type=int, default=None)
    parser.add_argument("--budget", type=int, default=8, help="directions per step")
    parser.add_argument("--sampling", nargs="+", default=["balanced", "by_target"],
                        choices=["uniform", "balanced", "by_target"], help="direction samplings to compare")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    ns = args.n or ([2, 3, 5] if args.quick else [2, 3, 5, 9, 15])
    n_train = args.n_train or (500 if args.quick else 10_000)
    n_valid = args.n_valid or (100 if args.quick else 1000)
    steps = args.steps or (5 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 2)
    cells = [(sampling, n) for sampling in args.sampling for n in ns]
    runs: dict[tuple[str, int], list[dict]] = {cell: [] for cell in cells}
    for r in range(repeats):
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        for sampling, n in order:
            command = [sys.executable, str(HERE / "many_models.py"), "--child", str(n), str(n_train), str(n_valid),
                       str(args.budget), str(args.batch), str(steps), sampling]
            out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                raise RuntimeError(f"n={n} ({sampling}) failed: {out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[(sampling, n)].append(result)
            print(f"[many_models] n={n} {sampling}: step {result['step_cpu_s']:.3f}s CPU / "
                  f"{result['step_wall_s']:.3f}s wall, peak RSS {result['peak_rss_mib']:.0f} MiB (caches "
                  f"{result['cache_mib']:.0f} MiB, direction arrays {result['direction_arrays_mib']:.1f} MiB), "
                  f"build {result['build_s']:.0f}s, load {result['loadavg'][0]:.1f}", flush=True)
    header = ["sampling", "n models", "directions", "budget", "CPU s/step", "wall s/step", "peak RSS MiB",
              "after build MiB", "caches MiB", "direction arrays MiB", "build s"]
    rows = []
    for sampling, n in cells:
        rs = runs[(sampling, n)]
        rows.append([sampling, n, n * n, min(args.budget, n * n), median([r["step_cpu_s"] for r in rs]),
                     median([r["step_wall_s"] for r in rs]), max(r["peak_rss_mib"] for r in rs),
                     max(r["peak_rss_after_build_mib"] for r in rs), rs[0]["cache_mib"],
                     rs[0]["direction_arrays_mib"], median([r["build_s"] for r in rs])])
    print_table(f"Step time and peak memory versus n (budget {args.budget} directions/step, batch {args.batch}, "
                f"n_train {n_train}, n_valid {n_valid}, 1 thread)", header, rows)
    payload = {"n_train": n_train, "n_valid": n_valid, "budget": args.budget, "batch": args.batch, "steps": steps,
               "repeats": repeats, "samplings": args.sampling,
               "runs": {f"{sampling}:{n}": rs for (sampling, n), rs in runs.items()},
               "table_markdown": markdown_table(header, rows)}
    write_result("many_models", payload)
    return payload


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        n, n_train, n_valid, budget, batch, steps = map(int, sys.argv[2:8])
        print(json.dumps(child(n, n_train, n_valid, budget, batch, steps, sys.argv[8])))
    else:
        main(sys.argv[1:])
