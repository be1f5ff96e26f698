"""Each model's own direction weighted in the joint MAS loss (``train.own_weight``): validation trial IIA
(teacher forced) of every direction every ``--eval-every`` steps, printed as architecture blocks.

    python bench/own_weight.py --weight 30 --steps 300      # the 15 shipped MultiObject models, ~25 min

Every direction every step, every model's latents z-scored (``standardize``), k 32, 2 000 / 256 pairs per
direction, batch 128, lr 3e-3, seed 0: the settings of ``recipes/configs/many_models_standardized.yaml``.
One process, 1 thread. Results: bench/results/<--out>.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import hidden_mas_trainer, machine_info, valid_trial_iia, write_result

SHIPPED = [f"multiobject-{arch}-s{seed}" for arch in ("gru", "lstm", "transformer") for seed in range(5)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=SHIPPED)
    parser.add_argument("--weight", type=float, default=30.0, help="train.own_weight")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default="own_weight")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    problem, trainer = hidden_mas_trainer(args.models, {"batch_size": 128, "lr": 3e-3, "own_weight": args.weight},
                                          standardize=True)
    arch = [m.split("-")[1] for m in args.models]
    result = {"machine": machine_info(), "models": args.models, "own_weight": args.weight, "curve": []}
    cpu = 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            iia = valid_trial_iia(problem, trainer)
            blocks: dict[str, list[float]] = {}
            for (s, t), v in iia.items():
                if s != t:
                    blocks.setdefault(f"{arch[s]}>{arch[t]}", []).append(v)
            point = {"step": step, "cpu_s": cpu, "own": [iia[(i, i)] for i in range(len(arch))],
                     "blocks": {k: sum(v) / len(v) for k, v in sorted(blocks.items())},
                     "mean": sum(iia.values()) / len(iia),
                     "trial_iia": {f"{s}->{t}": v for (s, t), v in iia.items()}}
            result["curve"].append(point)
            print(f"[own_weight] w={args.weight} step {step} ({cpu:.0f} s CPU): mean {point['mean']:.3f}, own "
                  + " ".join(f"{v:.2f}" for v in point["own"]) + " | "
                  + " ".join(f"{k} {v:.2f}" for k, v in point["blocks"].items()), flush=True)
            write_result(args.out, result)
        if step == args.steps:
            break
        t0 = time.process_time()
        trainer.train_step()
        cpu += time.process_time() - t0
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
