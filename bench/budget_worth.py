"""What a budgeted step is worth: validation IIA against updates per direction, budgeted versus
every-direction training, on the same models, data and seed.

    python bench/budget_worth.py --n 3 --budget 3 --steps 150          # ~ minutes on one core

Runs (one process, 1 thread, consecutively): every direction every step, and ``directions_per_step =
budget`` with balanced sampling. Every ``--eval-every`` steps it records each direction's validation
trial IIA (teacher forced) and how many updates that direction has had, so the two runs can be read
at equal updates per direction. Results: bench/results/budget_worth.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import machine_info, write_result


def run(models: list[str], budget: int | None, steps: int, eval_every: int, n_train: int, n_valid: int,
        lr: float, sampling: str) -> dict:
    import torch

    from llm_mas.config import to_dict
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import config_from_kwargs
    from llm_mas.trainer import MASTrainer, TrainerConfig

    config = config_from_kwargs(
        models=[{"name": m, "site": "hidden"} for m in models], variables=["full"], k=32, directions="all",
        data={"n_train": n_train, "n_valid": n_valid}, progress=False,
        train={"batch_size": 128, "lr": lr, "directions_per_step": budget, "direction_sampling": sampling})
    problem = build_problem(config)
    alignments = build_alignments(config, problem)
    trainer = MASTrainer(alignments, problem, TrainerConfig(**{**to_dict(config.train), "seed": 0}), progress=False)
    every = trainer.trained_directions
    updates = {d: 0 for d in every}
    curve = []
    t0 = time.process_time()
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                records = problem.evaluate(trainer.materialize(), split="valid")
            curve.append({"step": step, "updates": {f"{s}->{t}": updates[(s, t)] for s, t in every},
                          "trial_iia": {f"{c.source}->{c.target}": r.trial_iia
                                        for c, r in zip(problem.splits["valid"], records)},
                          "cpu_s": time.process_time() - t0})
            mean = sum(r.trial_iia for r in records) / len(records)
            print(f"[budget_worth] budget={budget} step {step}: mean trial IIA {mean:.3f}, 0->1 "
                  f"{curve[-1]['trial_iia']['0->1']:.3f} after {updates[(0, 1)]} updates", flush=True)
        if step == steps:
            break
        rows, chosen = trainer._batch(step), trainer.step_directions(step)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = problem.loss(trainer._step_maps(chosen), rows, **({} if chosen is None else {"directions": chosen}))
        loss.backward()
        trainer.optimizer.step()
        for d in (every if chosen is None else chosen):
            updates[tuple(d)] += 1
    return {"budget": budget, "sampling": sampling, "curve": curve}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["multiobject-gru-s0", "multiobject-gru-s1", "multiobject-gru-s2"])
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-valid", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sampling", default="balanced")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result = {"machine": machine_info(), "models": args.models, "steps": args.steps, "lr": args.lr, "runs": []}
    for budget in (None, args.budget):
        result["runs"].append(run(args.models, budget, args.steps, args.eval_every, args.n_train, args.n_valid,
                                  args.lr, args.sampling))
    write_result("budget_worth", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
