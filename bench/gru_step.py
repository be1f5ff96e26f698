"""The 2-model GRU step (gru_gru_hidden) before and after the recurrent-path changes, in one process.

    python bench/gru_step.py                       # batch 128 and 512, 40 interleaved steps, profile after
    python bench/gru_step.py --batches 128 --steps 20 --no-profile

Variants, toggled per step in the same process (interleaved, the order rotating every step; each variant
has its own alignments and Adam state, all see the same rows):
- ``reference``: the hooked run of every target (``TaskModelProblem.direct_recurrent = False``) and the
  plain input products (``fold_inputs = False``): the code before issue 24;
- ``previous``: the folded input table and the direct run per length bucket through torch's GRU kernel under
  autograd (``packed_recurrent = False``, ``hand_backward = False``): issue 24's first recurrent path;
- ``packed``: one step and edit for all rows, then one packed run of every row up to its last scored label
  (``packed_recurrent``), still torch's kernel under autograd;
- ``new`` (as shipped): packed, through the hand-written recurrence (``GRUTaskModel.hand_backward``: no
  autograd graph per time step, the latent's gradient only) with its candidate as 2 sigmoid(2u) - 1;
- ``new_tanh``: ``new`` with torch's tanh for the candidate (``tanh_by_sigmoid = False``).

A step is the MASTrainer step (materialize, loss, backward, Adam). Reported: the median process-CPU and wall
time of each variant, the medians of the per-step ratios reference / variant and previous / variant, and the
largest relative difference of a step's loss from the reference's (the packed run rounds differently: 1e-7).
The shipped checkpoints are used (the step's cost does not depend on the weights), n_train 2 000 (nor on that).
``--profile``: a torch.profiler table and the phase times of the new step. Results: bench/results/gru_step.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from common import machine_info, median, write_result

# fold_inputs, direct_recurrent, packed_recurrent, hand_backward, tanh_by_sigmoid
VARIANTS = {"reference": (False, False, False, False, True), "previous": (True, True, False, False, True),
            "packed": (True, True, True, False, True), "new": (True, True, True, True, True),
            "new_tanh": (True, True, True, True, False)}


def run(batch: int, steps: int, profile: bool) -> dict:
    from llm_mas.llm.record import IGNORE_INDEX
    from llm_mas.models.task_models import GRUTaskModel, _RecurrentTaskModel
    from llm_mas.presets import resolve_preset
    from llm_mas.problems.task import TaskModelProblem
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import load_mas_config

    cfg = load_mas_config(resolve_preset("gru_gru_hidden"),
                          ["data.n_train=2000", "data.n_valid=100", "progress=false", f"train.batch_size={batch}"])
    problem = build_problem(cfg)

    def use(name: str) -> None:
        (_RecurrentTaskModel.fold_inputs, TaskModelProblem.direct_recurrent, TaskModelProblem.packed_recurrent,
         GRUTaskModel.hand_backward, GRUTaskModel.tanh_by_sigmoid) = VARIANTS[name]

    state = {}
    for name in VARIANTS:
        alignments = build_alignments(cfg, problem)
        state[name] = (alignments, torch.optim.Adam(alignments.parameters(), lr=cfg.train.lr))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(cfg.data.n_train, generator=g)[:batch] for _ in range(steps + 2)]

    def step(name: str, rows: torch.Tensor) -> float:
        alignments, optimizer = state[name]
        optimizer.zero_grad(set_to_none=True)
        loss, _ = problem.loss([a.materialize() for a in alignments], rows)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    names = list(VARIANTS)
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    losses = {n: [] for n in names}
    for i, rows in enumerate(batches):
        for name in names[i % len(names):] + names[:i % len(names)]:
            use(name)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name].append(step(name, rows))
            if i >= 2:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    out = {"batch": batch, "steps": steps, "loadavg": list(os.getloadavg()), "variants": {}}
    for name in names:
        ratios = [a / b for a, b in zip(cpu["reference"], cpu[name])]
        out["variants"][name] = {
            "cpu_s": median(cpu[name]), "wall_s": median(wall[name]), "cpu_ratio_reference_over": median(ratios),
            "cpu_ratio_range": [min(ratios), max(ratios)],
            "cpu_ratio_previous_over": median([a / b for a, b in zip(cpu["previous"], cpu[name])]),
            "losses_identical": losses[name] == losses["reference"],
            "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses["reference"]))}
    if profile:
        use("new")
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for rows in batches[:5]:
                step("new", rows)
        out["profile_new"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        phases = {"materialize": [], "forward_loss": [], "backward": [], "adam": []}
        alignments, optimizer = state["new"]
        for rows in batches[:10]:
            optimizer.zero_grad(set_to_none=True)
            c = [time.process_time()]
            maps = [a.materialize() for a in alignments]
            c.append(time.process_time())
            loss, _ = problem.loss(maps, rows)
            c.append(time.process_time())
            loss.backward()
            c.append(time.process_time())
            optimizer.step()
            c.append(time.process_time())
            for key, a, b in zip(phases, c, c[1:]):
                phases[key].append(b - a)
        out["phases_new_cpu_ms"] = {k: 1e3 * median(v) for k, v in phases.items()}
        # the head alone (forward + backward into its input) on this step's scored positions, and the two
        # alignments' materialize + backward, as shares of the step
        model = problem.models[0].model
        n_scored = sum(int((c.batch(batches[0]).labels != IGNORE_INDEX).sum()) for c in problem.splits["train"])
        feats = torch.randn(n_scored, model.d_model)
        head, mat = [], []
        for _ in range(10):
            f = feats.clone().requires_grad_(True)
            c0 = time.process_time()
            model.readout(f).sum().backward()
            head.append(time.process_time() - c0)
            c0 = time.process_time()
            maps = [a.materialize() for a in alignments]
            sum(m.weight[:, :cfg.k].sum() for m in maps).backward()
            mat.append(time.process_time() - c0)
        out["head_fwd_bwd_cpu_ms"] = 1e3 * median(head)
        out["scored_positions"] = n_scored
        out["materialize_bwd_two_alignments_cpu_ms"] = 1e3 * median(mat)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--name", default="gru_step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"machine": machine_info(), "runs": []}
    for batch in args.batches:
        r = run(batch, args.steps, profile=not args.no_profile and batch == 128)
        result["runs"].append(r)
        for name, v in r["variants"].items():
            print(f"[gru_step] batch {batch} {name:9s}: CPU {1e3 * v['cpu_s']:6.1f} ms, wall {1e3 * v['wall_s']:6.1f} ms,"
                  f" reference/{name} {v['cpu_ratio_reference_over']:.3f}, previous/{name}"
                  f" {v['cpu_ratio_previous_over']:.3f}, max rel loss diff {v['max_rel_loss_diff']:.1e}"
                  f" (load {r['loadavg'][0]:.1f})", flush=True)
        if "profile_new" in r:
            print(r["profile_new"])
            print("phases (CPU ms):", r["phases_new_cpu_ms"], "head fwd+bwd", r["head_fwd_bwd_cpu_ms"],
                  "ms on", r["scored_positions"], "positions; materialize+bwd of both alignments",
                  r["materialize_bwd_two_alignments_cpu_ms"], "ms")
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
