"""`llm-mas demo` (= `make demo`): MAS on the shipped checkpoints.

1. two MultiObject GRU seeds at the hidden state (indywise, k = 32, full causal state);
2. a MultiObject GRU and a 2-layer Transformer at their hidden states (same settings).

Prints each IIA matrix (rows = source, columns = target) and writes runs/demo-*/ with plots.
Budgets are set so the whole demo takes a few minutes on 2 CPU cores; `--quick` takes seconds.
"""

from __future__ import annotations

import time

# name, models, full-size budget (data sizes, training budget). The GRU pair converges within the budget;
# the Transformer's steps cost more (no prefix skipping through attention) and its IIA stays low anyway.
DEMO_RUNS = [
    ("demo-gru-vs-gru", ["multiobject-gru-s0", "multiobject-gru-s1"],
     {"n_train": 4000, "n_valid": 500}, {"batch_size": 256, "max_steps": 320, "eval_every": 32, "patience": 4}),
    ("demo-gru-vs-transformer", ["multiobject-gru-s0", "multiobject-transformer-s0"],
     {"n_train": 2000, "n_valid": 500}, {"batch_size": 256, "max_steps": 64, "eval_every": 16, "patience": 4}),
]


def demo_configs(out_dir: str = "runs", quick: bool = False):
    from .config import from_dict
    from .run_config import MASConfig

    configs = []
    for name, models, full_data, full_train in DEMO_RUNS:
        data = {"n_train": 512, "n_valid": 200} if quick else full_data
        train = {"max_steps": 4, "eval_every": 2} if quick else full_train
        configs.append(from_dict(MASConfig, {
            "name": name + ("-quick" if quick else ""), "seed": 0, "k": 32, "variables": ["full"],
            "models": [{"name": m, "site": "hidden"} for m in models],
            "data": data, "train": train, "eval": {"batch_size": 500}, "out_dir": out_dir, "resume": False}))
    return configs


def run_demo(out_dir: str = "runs", quick: bool = False, echo=print) -> list:
    from .run import run

    results = []
    t0 = time.perf_counter()
    for cfg in demo_configs(out_dir, quick):
        echo(f"\n=== {cfg.name}: {' vs '.join(m.name for m in cfg.models)} "
             f"(site {cfg.models[0].site}, k={cfg.k}, {cfg.variables[0]} state) ===")
        res = run(cfg, log=echo)
        echo(f"trial IIA (rows = source, columns = target):\n{res.table()}")
        echo(f"token IIA:\n{res.table(metric='token_iia')}")
        echo(f"plot: {res.run_dir / 'iia_matrix.png'}")
        results.append(res)
    echo(f"\ndemo finished in {time.perf_counter() - t0:.0f}s")
    return results
