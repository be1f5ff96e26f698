"""Per-step price of an orthogonal alignment's parametrisation: materialize + backward, by width and map.

    python bench/alignment_cost.py                  # d = 64 .. 1024, matrix_exp vs cayley, 1 thread
    python bench/alignment_cost.py --quick

A MAS step pays this once per model (the map is evaluated once per step and its gradient flows back through
it once). torch's matrix exponential differentiates through the exponential of a 2d x 2d block matrix, so its
backward grows as d^3 with a large constant; the Cayley map needs one linear solve.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import alignment_cost, print_table, set_threads, write_result

MAPS = ("matrix_exp", "cayley")


def measure(d: int, repeats: int) -> dict:
    cpu: dict[str, float] = {}
    wall = alignment_cost(d, d // 2, repeats=repeats, maps=MAPS, cpu_ms=cpu)
    return {"wall_ms": wall, "cpu_ms": cpu, "loadavg_after": os.getloadavg()[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    set_threads(1)
    widths = args.widths or ([64, 128] if args.quick else [64, 128, 256, 512, 1024])
    result = {"threads": 1, "widths": {}}
    for d in widths:
        repeats = 3 if d >= 1024 else 5
        result["widths"][str(d)] = measure(d, repeats)
        r = result["widths"][str(d)]
        print(f"[alignment] d {d}: " + ", ".join(f"{m} {r['wall_ms'][m]:.1f} ms wall / {r['cpu_ms'][m]:.1f} ms CPU"
                                                 for m in MAPS) + f"; load {r['loadavg_after']:.1f}")
    rows = [[d, r["cpu_ms"]["matrix_exp"], r["cpu_ms"]["cayley"], r["cpu_ms"]["matrix_exp"] / r["cpu_ms"]["cayley"],
             r["wall_ms"]["matrix_exp"], r["wall_ms"]["cayley"], r["loadavg_after"]]
            for d, r in result["widths"].items()]
    print_table("One orthogonal alignment, materialize + backward, 1 thread (medians)",
                ["d", "matrix_exp CPU ms", "cayley CPU ms", "ratio", "matrix_exp wall ms", "cayley wall ms", "load1"],
                rows)
    write_result("alignment_cost", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
