"""FLOPs of an every-direction MAS step at n = 15 against what this CPU's cores can do.

    python bench/flop_rate.py                                   # n = 15, every model at hidden, 1 thread
    python bench/flop_rate.py --transformer-site layer0 --n 9

A step (``MASTrainer.train_step``: materialize, loss, backward, Adam; every direction, batch 128) is counted
once with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, attention; element-wise work is not
counted, so the rate below is a lower bound of the work done) and timed over a few steps (median process
CPU time). The machine's peak is measured the same way on one thread: a square float32 matrix product
(the best case of this BLAS) and products of the step's own shapes (128-row operands against 128-512-wide
weights, the most a step's matrix products could reach). The ratio says how much of a step's time is
arithmetic the CPU cannot do faster, and what a step would cost at that peak: the floor under the wall time
of a run at this n. Models: as ``bench/direction_cost.py`` (shipped MultiObject GRU, LSTM, Transformer
seeds, interleaved; GRUs and LSTMs at ``hidden``). Result: bench/results/flop_rate.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import machine_info, median, write_result

ORDER = [f"multiobject-{arch}-s{seed}" for seed in range(5) for arch in ("gru", "lstm", "transformer")]


def peak_gflops(shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> dict[str, float]:
    """Sustained float32 GFLOP/s of `a @ b` for each (m, k, n), one thread, over ~`seconds` each."""
    import torch

    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, c0 = 0, time.process_time()
        while time.process_time() - c0 < seconds:
            for _ in range(10):
                a @ b
            reps += 10
        out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.process_time() - c0) / 1e9
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=15)
    parser.add_argument("--transformer-site", default="hidden")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--name", default="flop_rate")
    args = parser.parse_args(argv)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    from llm_mas.config import to_dict
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import config_from_kwargs
    from llm_mas.trainer import MASTrainer, TrainerConfig

    names = ORDER[:args.n]
    config = config_from_kwargs(
        models=[{"name": m, "site": args.transformer_site if "transformer" in m else "hidden"} for m in names],
        variables=["full"], k=32, directions="all", data={"n_train": args.n_train, "n_valid": 32}, progress=False,
        train={"batch_size": args.batch})
    problem = build_problem(config)
    problem.precompute_frozen("train")
    alignments = build_alignments(config, problem)
    trainer = MASTrainer(alignments, problem, TrainerConfig(**{**to_dict(config.train), "seed": 0}), progress=False)

    trainer.train_step()  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step()
    flops = counter.get_total_flops()
    by_op = {str(op): int(v) for op, v in sorted(counter.get_flop_counts().get("Global", {}).items(),
                                                   key=lambda kv: -kv[1])}
    cpu = []
    for _ in range(args.steps):
        c0 = time.process_time()
        trainer.train_step()
        cpu.append(time.process_time() - c0)
    step_cpu = median(cpu)
    peaks = peak_gflops([(2048, 2048, 2048), (128, 128, 384), (128, 128, 512), (128, 512, 128)])
    best = max(peaks.values())
    rate = flops / step_cpu / 1e9
    result = {"machine": machine_info(), "n": args.n, "directions": args.n ** 2, "models": names,
              "transformer_site": args.transformer_site, "batch": args.batch, "step_flops": flops,
              "flops_by_op": by_op, "step_cpu_s": step_cpu, "step_cpu_s_all": cpu, "achieved_gflops": rate,
              "peak_gflops_1thread": peaks, "fraction_of_peak": rate / best,
              "step_s_at_peak": flops / (best * 1e9), "loadavg": list(os.getloadavg())}
    print(f"[flop_rate] n={args.n} ({args.transformer_site}): {flops / 1e9:.2f} GFLOP a step (matrix products), "
          f"{step_cpu:.2f} s CPU a step -> {rate:.2f} GFLOP/s; 1-thread peak {best:.1f} GFLOP/s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in peaks.items())}): {100 * rate / best:.1f}% of peak; "
          f"at peak a step would take {result['step_s_at_peak']:.3f} s", flush=True)
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]) else 1)
