"""Helpers shared by the benchmarks: machine facts, interleaved timing, ratios, tables, JSON results.

The machine these run on is shared and loaded, so absolute times drift by tens of percent between minutes.
Every comparison is therefore *interleaved*: each round runs every variant once (in a rotating order), and
ratios are taken within a round and then summarised by their median. Absolute numbers are reported with the
load average they were measured under.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# the tiny Llama/Qwen2 shapes of the middle-layer step benches (bench/pyvene_das.py, bench/llm_mas_step.py)
MIDDLE_LAYER_SIZES = {
    "256d-4L": dict(hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=704),
    "512d-8L": dict(hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=1408),
    "64d-2L": dict(hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128),  # --quick
}


def machine_info() -> dict:
    """Cores, load average, torch version and thread settings (recorded in every result file)."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def interleaved(variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of every variant: `warmup` untimed rounds, then `repeats` timed rounds.

    Each round calls every variant once; the order rotates from round to round so no variant always runs
    right after the same neighbour (caches, turbo, a burst of load from another process).
    cpu: if given, filled with the process CPU seconds of every call (all threads). With one torch thread
    this is close to what the call would take on an idle core, whatever the load: the load stretches wall
    time (the process waits for a core) far more than CPU time.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    if cpu is not None:
        cpu.update({name: [] for name in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            c0 = time.process_time()
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu[name].append(time.process_time() - c0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> dict:
    """Median of the per-round ratios numerator/denominator (rounds are interleaved), with min and max."""
    per_round = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {"median": median(per_round), "min": min(per_round), "max": max(per_round), "n": len(per_round)}


def timing_summary(times: list[float]) -> dict:
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def write_result(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json (machine info included) and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    print(f"\nwrote {path}")
    return path


def _json_default(x: object) -> object:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def alignment_cost(d: int, k: int, repeats: int = 5, maps=("matrix_exp", "cayley"),
                   cpu_ms: dict[str, float] | None = None) -> dict:
    """ms to materialize one orthogonal alignment of width d and back-propagate through it, per map kind.

    This is the per-alignment, per-step price of the parametrisation (a MAS step pays it once per model).
    cpu_ms: if given, filled with the median process CPU ms per map kind.
    """
    import torch

    from llm_mas.alignments import make_alignment

    alignments = {m: make_alignment("orthogonal", d, k=k, seed=0, orthogonal_map=m) for m in maps}
    probe = torch.randn(d, d)

    def run(alignment):
        def call():
            weight = alignment.materialize().weight  # (d, d)
            (weight * probe).sum().backward()
            alignment.zero_grad(set_to_none=True)

        return call

    cpu: dict[str, list[float]] = {}
    times = interleaved({m: run(a) for m, a in alignments.items()}, repeats=repeats, warmup=1, cpu=cpu)
    if cpu_ms is not None:
        cpu_ms.update({m: 1e3 * median(v) for m, v in cpu.items()})
    return {m: 1e3 * median(ts) for m, ts in times.items()}


def hidden_mas_trainer(models: list[str], train: dict, n_train: int = 2000, n_valid: int = 256,
                       standardize: bool = False):
    """(problem, trainer) of a joint MAS over shipped task models at `hidden` (`full`, k 32, every direction
    trained and evaluated; `train`: TrainerConfig settings; trainer seed 0, no callbacks): the set-up of the
    training-quality benches (budget_worth.py, own_weight.py)."""
    from llm_mas.config import to_dict
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import config_from_kwargs
    from llm_mas.trainer import MASTrainer, TrainerConfig

    config = config_from_kwargs(
        models=[{"name": m, "site": "hidden", "standardize": standardize} for m in models], variables=["full"],
        k=32, directions="all", data={"n_train": n_train, "n_valid": n_valid}, progress=False, train=train)
    problem = build_problem(config)
    trainer = MASTrainer(build_alignments(config, problem), problem,
                         TrainerConfig(**{**to_dict(config.train), "seed": 0}), progress=False, callbacks=[])
    return problem, trainer


def valid_trial_iia(problem, trainer) -> dict[tuple[int, int], float]:
    """{(source, target): validation trial IIA} at the trainer's current alignments (teacher forced)."""
    import torch

    with torch.no_grad():
        records = problem.evaluate(trainer.materialize(), split="valid")
    return {(c.source, c.target): r.trial_iia for c, r in zip(problem.splits["valid"], records)}
