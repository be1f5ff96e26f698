"""A/B of two source trees of llm_mas on the same MAS workloads, in one run (alternating rounds).

    git worktree add /tmp/llm_mas_base db2cb09
    python bench/ab_compare.py --a /tmp/llm_mas_base --b . --rounds 5

Each round runs, for tree A then tree B (order alternating between rounds), one subprocess per workload that
builds the problem from a shipped preset, times training steps (materialize + loss + backward + Adam) and one
validation pass, with one torch thread, in process CPU time (less sensitive than wall time to other work on a shared
machine). Read the per-round B/A ratios, whose median is reported, not the absolute times. Written to bench/results/ab_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from common import median, write_result

WORKLOADS = {
    "gru-gru-hidden-indywise": ("gru_gru_hidden", ["k=32"]),
    "gru-gru-embeddings-stepwise": ("gru_gru_embeddings_stepwise", ["k=32"]),
    "gru-transformer-hidden-indywise": ("gru_transformer_hidden", ["k=32"]),
}

# Runs inside the tree under test; speaks both the old (llm_mas.mas) and the new (llm_mas.run) API.
HARNESS = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    preset, overrides, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    try:
        from llm_mas.run import build_problem, build_alignments
        from llm_mas.run_config import load_mas_config
        from llm_mas.presets import resolve_preset
        path = resolve_preset(preset)
    except ImportError:
        from llm_mas.mas import build_problem, build_alignments, load_mas_config
        path = f"recipes/configs/{preset}.yaml"
    cfg = load_mas_config(path, overrides)
    problem = build_problem(cfg)
    alignments = build_alignments(cfg, problem)
    optimizer = torch.optim.Adam(alignments.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):
        rows = torch.randperm(cfg.data.n_train, generator=g)[:cfg.train.batch_size]
        t0 = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = problem.loss([a.materialize() for a in alignments], rows)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.process_time() - t0)
    t0 = time.process_time()
    with torch.no_grad():
        problem.evaluate([a.materialize() for a in alignments], split="valid")
    evaluate = time.process_time() - t0
    times.sort()
    print(json.dumps({"step_s": times[len(times) // 2], "evaluate_s": evaluate, "loss": float(loss)}))
""")


def measure(tree: Path, preset: str, overrides: list[str], steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", HARNESS, preset, json.dumps(overrides), str(steps)], cwd=tree,
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {preset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="baseline source tree (e.g. a git worktree)")
    parser.add_argument("--b", type=Path, default=Path("."), help="tree under test [.]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per run (median taken)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    sizes = ["data.n_train=2000", "data.n_valid=500", f"train.batch_size={args.batch}", "progress=false"]
    out = {}
    for name in args.workloads:
        preset, extra = WORKLOADS[name]
        rows = []
        for r in range(args.rounds):
            order = [("a", args.a), ("b", args.b)] if r % 2 == 0 else [("b", args.b), ("a", args.a)]
            got = {label: measure(tree.resolve(), preset, sizes + extra, args.steps) for label, tree in order}
            rows.append(got)
            print(f"{name} round {r}: step A {got['a']['step_s']:.4f} s, B {got['b']['step_s']:.4f} s "
                  f"(B/A {got['b']['step_s'] / got['a']['step_s']:.3f}); evaluate A {got['a']['evaluate_s']:.2f} s, "
                  f"B {got['b']['evaluate_s']:.2f} s", flush=True)
        out[name] = {
            "step_ratio_b_over_a": median([g["b"]["step_s"] / g["a"]["step_s"] for g in rows]),
            "evaluate_ratio_b_over_a": median([g["b"]["evaluate_s"] / g["a"]["evaluate_s"] for g in rows]),
            "same_loss": all(g["a"]["loss"] == g["b"]["loss"] for g in rows),
            "rounds": rows,
        }
        print(f"{name}: median B/A step {out[name]['step_ratio_b_over_a']:.3f}, evaluate "
              f"{out[name]['evaluate_ratio_b_over_a']:.3f}, identical loss {out[name]['same_loss']}", flush=True)
    write_result("ab_compare", {"a": str(args.a), "b": str(args.b), "batch": args.batch, "steps": args.steps,
                                "workloads": out})


if __name__ == "__main__":
    main()
