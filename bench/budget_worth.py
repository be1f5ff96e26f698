"""What a budgeted step is worth: validation IIA against updates per direction, steps and CPU, budgeted
versus every-direction training, on the same models, data and seed.

    python bench/budget_worth.py --n 3 --budget 3 --steps 150          # ~ minutes on one core

Runs (one process, 1 thread, consecutively; ``--modes``): every direction every step (``every``, ``--steps``
steps), and ``directions_per_step = budget`` with each ``--sampling`` (``train.direction_sampling``, default
balanced; ``--budget-steps`` steps, default enough for as many updates per direction as the every-direction
run), its step's gradient either the
sampled directions' alone (``sampled``), the gradient memory's (``memory``: each direction's last
gradient, SAG; ``train.budget_gradients``) or the sampled one with each alignment's gradient rescaled to
estimate its every-direction gradient (``scaled``: bench-only, a ``sync_gradients`` hook). Each step is ``MASTrainer.train_step``. Every ``--eval-every``
steps it records each direction's validation trial IIA (teacher forced), how many updates each direction
has had and the training CPU seconds so far (validations excluded), so the runs can be read at equal
updates per direction, equal steps and equal CPU; ``--cosine`` adds, at the same points, the cosine between
the step's gradient and the every-direction gradient at the parameters and rows of that step;
``--lr-schedule cosine`` decays every run's rate to 0 over its own steps (``train.lr_schedule``).
Results: bench/results/<--out>.json (budget_worth.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from common import hidden_mas_trainer, machine_info, valid_trial_iia, write_result


def _cosine_to_full(trainer, before: dict, rows) -> float:
    """Cosine between the gradient the last step used (left in .grad) and the every-direction loss's gradient
    at the parameters that step started from (``before``) on the same rows; the parameters are put back."""
    import torch

    used = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in trainer.alignments.parameters()])
    after = {k: v.clone() for k, v in trainer.alignments.state_dict().items()}
    trainer.alignments.load_state_dict(before)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.problem.loss(trainer.materialize(), rows)
    loss.backward()
    full = torch.cat([p.grad.reshape(-1) for p in trainer.alignments.parameters()])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.alignments.load_state_dict(after)
    return float(torch.nn.functional.cosine_similarity(used, full, dim=0))


def _per_matrix_scaling(trainer):
    """A ``sync_gradients`` hook for ``--modes scaled``: scale each alignment's gradient by
    (b / D) · (f_m / c_m), where the step trains b of D directions, c_m of them touch alignment m (as source
    or target) and f_m of all trained directions do. The step's loss is the mean over its b directions, so
    alignment m's gradient is (1/b)·Σ of its c_m sampled directions' gradients; scaled, it is the unbiased
    per-matrix estimate of the every-direction gradient (1/D)·Σ over its f_m directions, whatever the number
    of sampled directions that touch m this step (by_target: a target's n, then a source's one or two)."""
    every = trainer.trained_directions

    def touching(m, directions):
        return sum(1 for s, t in directions if m in (s, t))

    def hook(alignments):
        directions = trainer.step_directions(trainer.step)
        if directions is None:
            return
        for m, a in enumerate(alignments):
            c = touching(m, directions)
            for p in a.parameters():
                if p.grad is not None and c:
                    p.grad.mul_(len(directions) / len(every) * touching(m, every) / c)
    return hook


def run(models: list[str], budget: int | None, steps: int, eval_every: int, n_train: int, n_valid: int,
        lr: float, sampling: str, gradients: str = "sampled", cosine: bool = False,
        standardize: bool = False, lr_schedule: str = "constant") -> dict:

    problem, trainer = hidden_mas_trainer(
        models, {"batch_size": 128, "lr": lr, "directions_per_step": budget, "direction_sampling": sampling,
                 "budget_gradients": "sampled" if gradients == "scaled" else gradients,
                 "lr_schedule": lr_schedule, "max_steps": steps},
        n_train=n_train, n_valid=n_valid, standardize=standardize)
    alignments = trainer.alignments
    if gradients == "scaled":
        trainer.sync_gradients = _per_matrix_scaling(trainer)
    every = trainer.trained_directions
    updates = {d: 0 for d in every}
    curve, cosines = [], []
    cpu = 0.0
    label = "every" if budget is None else f"{gradients}/{sampling}"
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            iia = valid_trial_iia(problem, trainer)
            curve.append({"step": step, "updates": {f"{s}->{t}": updates[(s, t)] for s, t in every},
                          "trial_iia": {f"{s}->{t}": v for (s, t), v in iia.items()},
                          "cpu_s": cpu})
            mean = sum(iia.values()) / len(iia)
            print(f"[budget_worth] {label} budget={budget} step {step}: mean trial IIA {mean:.3f}, 0->1 "
                  f"{curve[-1]['trial_iia']['0->1']:.3f} after {updates[(0, 1)]} updates, {cpu:.1f} s CPU",
                  flush=True)
        if step == steps:
            break
        measure = cosine and (step + 1) % eval_every == 0
        before = {k: v.clone() for k, v in alignments.state_dict().items()} if measure else None
        t0 = time.process_time()
        out = trainer.train_step()
        cpu += time.process_time() - t0
        if measure:   # how close the step's gradient was to the every-direction one (outside the CPU count)
            cos = _cosine_to_full(trainer, before, trainer._batch(step))
            cosines.append({"step": step + 1, "cosine": cos})
            print(f"[budget_worth] {label} step {step + 1}: cosine to the every-direction gradient {cos:.3f}",
                  flush=True)
        for d in (every if out.directions is None else out.directions):
            updates[tuple(d)] += 1
    return {"budget": budget, "sampling": sampling, "gradients": label, "steps": steps, "curve": curve,
            **({"cosine_to_full": cosines} if cosine else {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["multiobject-gru-s0", "multiobject-gru-s1", "multiobject-gru-s2"])
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="steps of the every-direction run")
    parser.add_argument("--budget-steps", type=int, default=None,
                        help="steps of the budgeted runs [as many updates per direction as --steps]")
    parser.add_argument("--modes", nargs="+", default=["every", "sampled", "memory"],
                        choices=["every", "sampled", "memory", "scaled"])
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-valid", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sampling", nargs="+", default=["balanced"],
                        choices=["uniform", "balanced", "by_target"],
                        help="train.direction_sampling of the budgeted runs; each budgeted mode runs once per "
                             "sampling given")
    parser.add_argument("--standardize", action="store_true",
                        help="z-score every model's latents inside its alignment (models.i.standardize)")
    parser.add_argument("--out", default="budget_worth", help="result name under bench/results/")
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                        help="train.lr_schedule of every run (cosine: from --lr down to 0 over that run's steps)")
    parser.add_argument("--cosine", action="store_true",
                        help="at every --eval-every steps, the cosine between the step's gradient and the "
                             "every-direction gradient at the same parameters and rows")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    n_directions = len(args.models) ** 2
    budget_steps = args.budget_steps or args.steps * math.ceil(n_directions / args.budget)
    result = {"machine": machine_info(), "models": args.models, "steps": args.steps, "budget_steps": budget_steps,
              "lr": args.lr, "lr_schedule": args.lr_schedule, "standardize": args.standardize, "runs": []}
    for mode in args.modes:
        budget = None if mode == "every" else args.budget
        for sampling in args.sampling[:1] if budget is None else args.sampling:   # every: sampling unused
            result["runs"].append(run(args.models, budget, args.steps if budget is None else budget_steps,
                                      args.eval_every, args.n_train, args.n_valid, args.lr, sampling,
                                      "sampled" if budget is None else mode, args.cosine, args.standardize,
                                      args.lr_schedule))
            result["machine_after"] = machine_info()
            write_result(args.out, result)   # after every run: a killed bench keeps what it finished
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
