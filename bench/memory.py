"""Peak memory (RSS high-water mark) of `llm-mas demo` and of one stepwise LLM MAS step on the mid-size Qwen2.

    python bench/memory.py                      # demo (if the shipped checkpoints exist) + LLM step per backend
    python bench/memory.py --skip-demo
    python bench/memory.py --demo full:1 quick:default quick:1   # demo runs as MODE:OMP_NUM_THREADS

Each measurement runs in a fresh wrapper process whose only child is the measured command; the wrapper reads
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the child's peak resident set, KiB on Linux) and the wall
time. The LLM-step child also reports its own RSS right after its imports, so model + activation memory can be
told apart from the interpreter and libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_table, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _rss_now_mib() -> float:
    """Current resident set of this process (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_self_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- wrapper
def wrap(command: list[str]) -> dict:
    """Run `command` as this process's only child; its peak RSS and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 1024
    return {"command": command, "returncode": proc.returncode, "wall_s": wall, "peak_rss_mib": peak,
            "cpu_s": usage.ru_utime + usage.ru_stime, "loadavg_after": list(os.getloadavg()),
            "stdout_tail": proc.stdout[-3000:], "stderr_tail": proc.stderr[-3000:]}


def measure(command: list[str], timeout: float | None = None) -> dict:
    """Measure `command` in a fresh wrapper process (so earlier children do not count)."""
    out = subprocess.run([sys.executable, str(HERE / "memory.py"), "--wrap", "--", *command], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory wrapper failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- children
def child_llm_step(size: str, backend: str, steps: int, threads: int) -> None:
    """Build the LLM step of bench/llm_step.py for one backend, run `steps` steps, print a JSON line."""
    import torch

    torch.set_num_threads(threads)
    from llm_step import SIZES, LLMStep

    after_imports = _rss_now_mib()
    spec = SIZES[size]
    bench = LLMStep(size, spec["batch"], spec["length"], variants=(backend,))
    after_build = _rss_now_mib()
    try:
        for _ in range(steps):
            bench.step(backend)
    finally:
        bench.close()
    print(json.dumps({"rss_after_imports_mib": after_imports, "rss_after_build_mib": after_build,
                      "peak_self_mib": _peak_self_mib(), "batch": spec["batch"], "length": spec["length"]}))


def demo_available() -> tuple[bool, str]:
    """Whether the shipped checkpoints the demo needs can be resolved (and why not)."""
    try:
        from llm_mas.demo import demo_configs
        from llm_mas.models import load_task_model

        names = sorted({m.name for config in demo_configs() for m in config.models})
    except Exception as e:  # noqa: BLE001 - whatever stops us listing the demo's models means "skip"
        return False, f"cannot list the demo's models ({type(e).__name__}: {e})"
    missing = []
    for name in names:
        try:
            load_task_model(name)  # small: loading is the surest check that the checkpoint is usable
        except Exception as e:  # noqa: BLE001 - any failure to resolve a shipped model means "skip"
            missing.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if missing:
        return False, "shipped checkpoints not found: " + "; ".join(missing)
    return True, "checkpoints " + ", ".join(names)


# ---------------------------------------------------------------------------------------------- main
def run_demo(quick: bool, threads: int | None, checkpoints: str) -> dict:
    """Measure `llm-mas demo [--quick]` with OMP_NUM_THREADS=threads (None: unset, torch's default)."""
    llm_mas = Path(sys.executable).with_name("llm-mas")
    out_dir = tempfile.mkdtemp(prefix="llm_mas_demo_")
    command = [str(llm_mas), "demo", "--out-dir", out_dir] + (["--quick"] if quick else [])
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the wrapper and the demo
    try:
        r = measure(command)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
        shutil.rmtree(out_dir, ignore_errors=True)
    r.update({"quick": quick, "omp_num_threads": threads, "checkpoints": checkpoints})
    print(f"[memory] llm-mas demo{' --quick' if quick else ''} (OMP_NUM_THREADS={threads or 'unset'}): "
          f"peak {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.0f}s wall, {r['cpu_s']:.0f}s CPU, exit {r['returncode']}, "
          f"load {r['loadavg_after'][0]:.1f}")
    return r


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--demo", nargs="+", default=["full:default"],
                        help="demo runs as MODE:THREADS, MODE full|quick, THREADS an int or 'default' (OMP_NUM_THREADS "
                             "unset: torch uses one thread per core), e.g. full:1 quick:default quick:1")
    parser.add_argument("--backends", nargs="+", default=["hooks", "nnsight", "tlens"])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result: dict = {"machine_start": machine_info(), "size": args.size, "steps": args.steps,
                    "threads": args.threads, "demo": None, "demo_runs": [], "llm_step": {}}

    if args.skip_demo:
        result["demo"] = {"skipped": "--skip-demo"}
    else:
        ok, why = demo_available()
        if not ok:
            result["demo"] = {"skipped": why}
            print(f"[memory] llm-mas demo SKIPPED: {why}")
        else:
            for spec in args.demo:
                mode, _, threads = spec.partition(":")
                r = run_demo(mode == "quick", None if threads in ("", "default") else int(threads), why)
                result["demo_runs"].append(r)
            full = [r for r in result["demo_runs"] if not r["quick"]]
            result["demo"] = (full or result["demo_runs"])[0]  # the headline: the first full-size run

    for backend in args.backends:
        command = [sys.executable, str(HERE / "memory.py"), "--child-llm-step", args.size, backend,
                   str(args.steps), str(args.threads)]
        r = measure(command)
        try:
            r["child"] = json.loads(r["stdout_tail"].strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            r["child"] = None
        result["llm_step"][backend] = r
        print(f"[memory] one LLM step, {args.size} Qwen2, {backend}: peak {r['peak_rss_mib']:.0f} MiB "
              f"(after imports {r['child'] and r['child']['rss_after_imports_mib']:.0f} MiB), exit {r['returncode']}")

    rows = []
    for d in result["demo_runs"]:
        rows.append([f"llm-mas demo{' --quick' if d['quick'] else ''} (OMP_NUM_THREADS={d['omp_num_threads'] or 'unset'})",
                     d["peak_rss_mib"], "-", d["wall_s"], d["cpu_s"]])
    for backend, r in result["llm_step"].items():
        after = r["child"]["rss_after_imports_mib"] if r["child"] else "-"
        rows.append([f"LLM step ({args.size}, {backend}, {args.steps} steps)", r["peak_rss_mib"], after, r["wall_s"],
                     r["cpu_s"]])
    print_table("Peak RSS (MiB)", ["what", "peak RSS MiB", "RSS after imports MiB", "wall s", "CPU s"], rows)
    if result["demo"] and "skipped" in result["demo"]:
        print(f"llm-mas demo skipped: {result['demo']['skipped']}")
    write_result("memory", result)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap":
        print(json.dumps(wrap(sys.argv[3:] if sys.argv[2] == "--" else sys.argv[2:])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-llm-step":
        size, backend, steps, threads = sys.argv[2:6]
        child_llm_step(size, backend, int(steps), int(threads))
    else:
        main(sys.argv[1:])
