"""Run every benchmark (what `make bench` does) and write bench/results/*.json plus a summary.

    python bench/run_all.py            # full: ~30-60 min on 2 loaded cores
    python bench/run_all.py --quick    # smoke test of every script (a few minutes)
    python bench/run_all.py --only numeric_mas llm_step

Each benchmark runs in its own process (a fresh interpreter, so one's memory or threads do not leak into the
next). The summary (bench/results/summary.json) collects the headline figures and the targets they answer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine_info, markdown_table, print_table

HERE = Path(__file__).resolve().parent
BENCHES = ("numeric_mas", "llm_step", "alignment_cost", "memory")
# The full demo with 1 torch thread (on 2 loaded cores, 2 threads is many times slower), then the quick demo
# with torch's default threads and with 1, to show that difference.
MEMORY_ARGS = {False: ["--demo", "full:1", "quick:default", "quick:1"],
               True: ["--size", "tiny", "--demo", "quick:1"]}

# Targets from the benchmark issue.
TARGET_STEP_S = 0.15          # GRU-GRU indywise hidden, batch 128, 4 directions
TARGET_OVERHEAD = 1.5         # MAS step / bare forward + backward
TARGET_PAIRS_S = 5.0          # 4 x (10 000 + 1 000) pairs
TARGET_DEMO_S = 300.0
TARGET_DEMO_MIB = 3 * 1024
TARGET_NNSIGHT = 1.1          # nnsight / hooks on the mid-size model


def run(name: str, extra: list[str]) -> dict:
    command = [sys.executable, "-u", str(HERE / f"{name}.py"), *extra]
    print(f"\n===== {' '.join(command)}  (load {os.getloadavg()})", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(command, cwd=HERE.parent)
    return {"command": command, "returncode": code, "wall_s": time.perf_counter() - t0}


def summarize() -> dict:
    """Headline figures from the result files, each with its target."""
    rows, out = [], {}

    def load(name):
        path = RESULTS / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def step_rows(result, label):
        step = result["steps"].get("threads=1", {}).get("gru-gru-hidden-indywise", {}).get("128")
        if not step:
            return
        load_text = f"load {step['loadavg_before']:.1f}-{step['loadavg_after'][0]:.1f}"
        for what, s in (("wall", step["mas"]["median_s"]), ("CPU", step["mas"]["cpu_median_s"])):
            out[f"gru_gru_hidden_b128_{what}_s_per_step{label and '_' + label}"] = s
            rows.append([f"GRU-GRU indywise hidden, batch 128, 4 dirs, 1 thread{label and ' (' + label + ')'}: "
                         f"{what} s/step" + (f" ({load_text})" if what == "wall" else " (~ idle core)"), s,
                         f"<= {TARGET_STEP_S}", "yes" if s <= TARGET_STEP_S else "no"])

    numeric = load("numeric_mas")
    quiet = load("numeric_mas_headline_quiet")  # `numeric_mas.py --name numeric_mas_headline_quiet` when idle
    if quiet:
        step_rows(quiet, "idle machine")
    if numeric:
        step_rows(numeric, "")
        for name, per_batch in numeric["steps"].get("threads=1", {}).items():
            for batch, r in per_batch.items():
                o = r["overhead_ratio"]["median"]
                out[f"overhead_{name}_b{batch}"] = o
                rows.append([f"overhead MAS/bare, {name}, batch {batch}, 1 thread", o, f"<= {TARGET_OVERHEAD}",
                             "yes" if o <= TARGET_OVERHEAD else "no"])
        for name, s in numeric["setup"].items():
            if numeric["n_train"] == 10_000 and numeric["n_valid"] == 1000:
                t = s["sample_s"] + s["make_pairs_s"]
                rows.append([f"pairs 4 x (10 000 + 1 000), {name}: wall s (sample + make_pairs)", t,
                             f"<= {TARGET_PAIRS_S}", "yes" if t <= TARGET_PAIRS_S else "no"])
                rows.append([f"  whole NumericProblem set-up, {name}: wall s / CPU s",
                             f"{s['problem_setup_s']:.1f} / {s.get('problem_setup_cpu_s', float('nan')):.1f}", "-", "-"])
    llm = load("llm_step")
    if llm and "mid" in llm["sizes"]:
        for threads, t in llm["sizes"]["mid"]["threads"].items():
            r = t["nnsight/hooks"]["median"]
            rows.append([f"nnsight/hooks, mid-size Qwen2, {threads} thread(s)", r, f"<= {TARGET_NNSIGHT}",
                         "yes" if r <= TARGET_NNSIGHT else "no"])
            rows.append([f"  TL/hooks, mid-size Qwen2, {threads} thread(s)", t["tlens/hooks"]["median"], "-", "-"])
    memory = load("memory")
    if memory:
        demo = memory.get("demo") or {}
        runs = memory.get("demo_runs", [])
        for d in runs:
            what = f"llm-mas demo{' --quick' if d['quick'] else ''}, OMP_NUM_THREADS={d['omp_num_threads'] or 'unset'}"
            target = not d["quick"]
            rows.append([f"{what}: wall s (load {d.get('loadavg_after', [float('nan')])[0]:.1f})", d["wall_s"],
                         f"<= {TARGET_DEMO_S:.0f}" if target else "-",
                         ("yes" if d["wall_s"] <= TARGET_DEMO_S and d["returncode"] == 0 else "no") if target else "-"])
            if "cpu_s" in d:
                rows.append([f"{what}: CPU s", d["cpu_s"], "-", "-"])
            rows.append([f"{what}: peak RSS MiB", d["peak_rss_mib"], f"<= {TARGET_DEMO_MIB}" if target else "-",
                         ("yes" if d["peak_rss_mib"] <= TARGET_DEMO_MIB else "no") if target else "-"])
        if not runs:
            rows.append(["llm-mas demo", "skipped", demo.get("skipped", "-")[:100], "-"])
        size = memory.get("size", "mid")
        for backend, r in memory.get("llm_step", {}).items():
            rows.append([f"one LLM step ({size}), {backend}: peak RSS MiB", r["peak_rss_mib"], "-", "-"])
    header = ["figure", "value", "target", "met"]
    print_table("Summary against the targets", header, rows)
    (RESULTS / "summary.md").write_text(markdown_table(header, rows))
    return {"figures": out, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    args = parser.parse_args(argv)
    extra = ["--quick"] if args.quick else []
    runs = {}
    for name in args.only:
        runs[name] = run(name, extra if name != "memory" else MEMORY_ARGS[args.quick])
    summary = summarize()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(
        {"machine_end": machine_info(), "quick": args.quick, "runs": runs, **summary}, indent=1) + "\n")
    failed = [n for n, r in runs.items() if r["returncode"] != 0]
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
