"""MAS on the numeric task models: set-up, training-step throughput, overhead ratio, evaluation throughput.

    python bench/numeric_mas.py                 # n_train 10 000, batch 128 and 512, 1 and 2 torch threads
    python bench/numeric_mas.py --quick         # smoke test (small data, few repeats)
    python bench/numeric_mas.py --threads 1 --configs gru-gru-hidden-indywise

Configurations (2 models, all 4 directions trained, variable "full", k = 32, orthogonal alignments):
- gru-gru-hidden-indywise:           two GRUs, latent = the recurrent state, one position swapped;
- gru-gru-embeddings-stepwise:       two GRUs, latent = the input embedding, positions 0..i swapped;
- gru-transformer-hidden-indywise:   a GRU and a 2-layer Transformer, last-layer latent, one position.

Models have random weights (seeds 0 and 1): the compute of a training step and of a rollout does not depend on
the weights (sequence lengths are fixed by the data), so shipped checkpoints are not needed.

Figures (all ratios are medians of per-round ratios, variants interleaved round by round):
- setup: task.sample + make_pairs only for 4 directions x (n_train + n_valid), and the whole NumericProblem
  construction (sampling, latent collection, pairs, chunk tensors), timed separately;
- s/step (wall and process CPU time) and pairs/s of one MAS training step (the MASTrainer loop body: materialize the alignments, problem
  loss, backward, Adam step); pairs/s counts (direction, row) pairs, i.e. batch x 4 directions per step;
- the overhead ratio = MAS step / "bare" step. The bare step runs each target model, with no hooks and no
  alignment, as plain ``model(ids)`` on the same rows of the same full counterfactual sequences (the 2 x batch
  sequences of its two incoming directions concatenated, as MAS batches them, padded to the batch's longest
  sequence), takes the same cross-entropy on the scored tokens, and back-propagates into the embedding table (its ``requires_grad`` switched on for the
  bare step only). Gradient w.r.t. the embedding table, not the weights: a MAS backward computes no weight
  gradients of the frozen models, only activation gradients from the loss down to the intervened latent;
  asking for the embedding table's gradient runs exactly that chain (head, recurrence / attention, down to
  the input) plus one tiny index-add into a (V, 128) table. For a hidden-state site this is a slight upper
  bound of what MAS must back-propagate (it also computes d(input) at every step);
- "mas-full-run" (where a target is a 1-layer RNN at its state): MAS with ``fast_path=False``, i.e. every
  target run re-reads the whole counterfactual sequence instead of starting at the intervened token;
- evaluation: ``problem.evaluate`` on the validation split (teacher-forced pass + autoregressive rollout for
  every direction), pairs/s = 4 x n_valid / seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    alignment_cost,
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    set_threads,
    timing_summary,
    write_result,
)

from llm_mas.alignments import make_alignment
from llm_mas.llm.record import IGNORE_INDEX as IGNORE
from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry as ModelEntry
from llm_mas.problems.task import TaskModelProblem as NumericProblem
from llm_mas.sites import resolve_site
from llm_mas.tasks import PAD, get_task, make_pairs
from llm_mas.trainer import MASTrainer, TrainerConfig

TASK_NAME = "multiobject"
K = 32
CONFIGS = {
    "gru-gru-hidden-indywise": {"archs": ("gru", "gru"), "site": "hidden", "stepwise": False},
    "gru-gru-embeddings-stepwise": {"archs": ("gru", "gru"), "site": "embeddings", "stepwise": True},
    "gru-transformer-hidden-indywise": {"archs": ("gru", "transformer"), "site": "hidden", "stepwise": False},
}


def make_entries(archs, site: str) -> list[ModelEntry]:
    task = get_task(TASK_NAME)
    entries = []
    for seed, arch in enumerate(archs):
        model = build_task_model(arch, TASK_NAME, len(task.vocab), seed=seed).eval()
        model.requires_grad_(False)
        entries.append(ModelEntry(name=f"{arch}{seed}", model=model, task=task, site=resolve_site(model, site),
                                  width=model.d_model, variable_map={}))
    return entries


def build_problem(entries, stepwise: bool, n_train: int, n_valid: int, fast_path: bool = True) -> NumericProblem:
    return NumericProblem(entries, ["full"], K, stepwise=stepwise, n_train=n_train, n_valid=n_valid, seed=0,
                          fast_path=fast_path, progress=False)


# ---------------------------------------------------------------------------------------------- set-up
def time_pairs(stepwise: bool, n_models: int, n_train: int, n_valid: int) -> dict:
    """task.sample and make_pairs only, as NumericProblem does them: per split, one base batch per model,
    then one pair set per (source, target) direction ("full" variable)."""
    task = get_task(TASK_NAME)
    t_sample = t_pairs = c_pairs = 0.0
    n_pairs = 0
    for split_id, n in ((0, n_train), (1, n_valid)):
        rng = np.random.default_rng([0, split_id])
        t0 = time.perf_counter()
        bases = [task.sample(n, rng) for _ in range(n_models)]
        t_sample += time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(n_models):
            for t in range(n_models):
                pairs = make_pairs(task, bases[t], task, bases[s], "full", n, rng, stepwise=stepwise)
                n_pairs += len(pairs)
        t_pairs += time.perf_counter() - t0
        c_pairs += time.process_time() - c0
    return {"sample_s": t_sample, "make_pairs_s": t_pairs, "make_pairs_cpu_s": c_pairs, "n_pairs": n_pairs}


def time_setup(config: dict, n_train: int, n_valid: int, repeats: int) -> dict:
    pair_runs, problem_runs = [], []
    for _ in range(repeats):  # alternate the two measurements
        pair_runs.append(time_pairs(config["stepwise"], len(config["archs"]), n_train, n_valid))
        entries = make_entries(config["archs"], config["site"])
        t0, c0 = time.perf_counter(), time.process_time()
        build_problem(entries, config["stepwise"], n_train, n_valid)
        problem_runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return {
        "sample_s": median([r["sample_s"] for r in pair_runs]),
        "make_pairs_s": median([r["make_pairs_s"] for r in pair_runs]),
        "make_pairs_cpu_s": median([r["make_pairs_cpu_s"] for r in pair_runs]),
        "n_pairs": pair_runs[0]["n_pairs"],
        "problem_setup_s": median([wall for wall, _ in problem_runs]),
        "problem_setup_cpu_s": median([cpu for _, cpu in problem_runs]),
        "problem_setup_runs_s": problem_runs,
        "loadavg_after": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------- steps
def make_trainer(problem: NumericProblem, batch: int, seed: int = 0) -> MASTrainer:
    alignments = torch.nn.ModuleList(
        [make_alignment("orthogonal", e.width, k=K, seed=seed * 101 + i) for i, e in enumerate(problem.models)])
    return MASTrainer(alignments, problem, TrainerConfig(batch_size=batch, seed=seed), progress=False)


def mas_step(trainer: MASTrainer, rows: torch.Tensor) -> float:
    """The MASTrainer loop body (grad_accum = 1): materialize, loss, backward, Adam step."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.problem.loss(trainer.materialize(), rows)
    loss.backward()
    trainer.optimizer.step()
    return float(loss.detach())


def bare_step(full_problem: NumericProblem, rows: torch.Tensor) -> float:
    """Plain model(ids) forward + CE + backward of every target on the same full counterfactual sequences."""
    groups: dict[int, list] = {}
    for chunk in full_problem.splits["train"]:
        if chunk.trained:
            groups.setdefault(chunk.target, []).append(chunk)
    total = 0.0
    embeddings = []
    try:
        for target, chunks in groups.items():
            model = full_problem.models[target].model
            model.embed.weight.requires_grad_(True)  # the only thing with a gradient: see the module doc
            embeddings.append(model.embed.weight)
            views = [c.batch(rows) for c in chunks]                     # the run tensors of these rows
            width = max(v.input_ids.shape[1] for v in views)           # chunks differ in padded width
            ids = torch.cat([F.pad(v.input_ids, (0, width - v.input_ids.shape[1]), value=PAD)
                             for v in views])                          # (2B, L)
            labels = torch.cat([F.pad(v.labels, (0, width - v.labels.shape[1]), value=IGNORE)
                                for v in views])                       # (2B, L)
            # Padded to this batch's longest sequence, as any plain training loop would, not to the data set's.
            longest = int((ids != PAD).sum(1).max())
            ids, labels = ids[:, :longest], labels[:, :longest]        # (2B, L_batch)
            logits = model(ids)                                        # (2B, L, V)
            total = total + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        total.backward()
    finally:
        for weight in embeddings:
            weight.requires_grad_(False)
            weight.grad = None
    return float(total.detach())


def batches(n_train: int, batch: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_train, generator=g)[:batch] for _ in range(count)]


def scored_fraction(problem: NumericProblem, rows: torch.Tensor) -> dict:
    """Share of the (row, position) cells that carry a loss, in the padded runs MAS and the bare step make."""
    labels = [c.batch(rows).labels for c in problem.splits["train"] if c.trained]
    cells = sum(lab.numel() for lab in labels)
    scored = sum(int((lab != IGNORE).sum()) for lab in labels)
    return {"cells": cells, "scored": scored, "fraction": scored / max(cells, 1)}


def bench_steps(problem: NumericProblem, full_problem: NumericProblem, batch: int, repeats: int) -> dict:
    """Interleaved MAS step, MAS step without the fast path (if it applies) and bare step."""
    n_train = problem.n_train
    rows = batches(n_train, batch, repeats + 2)
    trainer = make_trainer(problem, batch)
    variants = {}

    def cycling(fn):
        state = {"i": 0}

        def call():
            fn(rows[state["i"] % len(rows)])
            state["i"] += 1

        return call

    variants["mas"] = cycling(lambda r: mas_step(trainer, r))
    if full_problem is not problem:
        full_trainer = make_trainer(full_problem, batch)
        variants["mas-full-run"] = cycling(lambda r: mas_step(full_trainer, r))
    variants["bare"] = cycling(lambda r: bare_step(full_problem, r))
    load_before = os.getloadavg()[0]
    cpu: dict[str, list[float]] = {}
    times = interleaved(variants, repeats=repeats, warmup=1, cpu=cpu)
    n_directions = sum(1 for c in problem.splits["train"] if c.trained)
    out = {"batch": batch, "directions": n_directions, "times_s": times, "cpu_times_s": cpu,
           "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())}
    for v, ts in times.items():
        out[v] = {**timing_summary(ts), "pairs_per_s": batch * n_directions / median(ts),
                  "cpu_median_s": median(cpu[v]), "cpu_pairs_per_s": batch * n_directions / median(cpu[v])}
    out["overhead_ratio"] = ratio(times, "mas", "bare")
    out["overhead_ratio_cpu"] = ratio(cpu, "mas", "bare")
    if "mas-full-run" in times:
        out["full_run_overhead_ratio"] = ratio(times, "mas-full-run", "bare")
        out["fast_path_speedup"] = ratio(times, "mas-full-run", "mas")
    out["scored_cells_bare"] = scored_fraction(full_problem, rows[0])
    out["scored_cells_mas"] = scored_fraction(problem, rows[0])
    return out


def bench_eval(problem: NumericProblem, repeats: int) -> dict:
    alignments = [make_alignment("orthogonal", e.width, k=K, seed=i) for i, e in enumerate(problem.models)]
    with torch.no_grad():
        maps = [a.materialize() for a in alignments]
        cpu: dict[str, list[float]] = {}
        times = interleaved({"evaluate": lambda: problem.evaluate(maps, split="valid")}, repeats=repeats,
                            warmup=0, cpu=cpu)["evaluate"]
    n_pairs = sum(len(c) for c in problem.splits["valid"])
    return {**timing_summary(times), "n_pairs": n_pairs, "pairs_per_s": n_pairs / median(times),
            "cpu_median_s": median(cpu["evaluate"]), "cpu_pairs_per_s": n_pairs / median(cpu["evaluate"]),
            "loadavg_after": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------------- profiling
def profile_step(problem: NumericProblem, batch: int, steps: int) -> dict:
    """Which ops and which Python functions dominate a MAS step (torch.profiler + cProfile)."""
    from torch.profiler import ProfilerActivity, profile

    trainer = make_trainer(problem, batch)
    rows = batches(problem.n_train, batch, steps + 2, seed=1)
    for r in rows[:2]:
        mas_step(trainer, r)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in rows[2:]:
            mas_step(trainer, r)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:15]]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)

    # Phases of the step, timed directly.
    phases = {"materialize": [], "forward_loss": [], "backward": [], "adam": []}
    for r in rows[2:]:
        trainer.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        maps = trainer.materialize()
        t1 = time.perf_counter()
        loss, _ = problem.loss(maps, r)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        trainer.optimizer.step()
        t4 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key].append(dt)
    phase_ms = {k: 1e3 * median(v) for k, v in phases.items()}

    # The RNN readout head alone (Linear -> GELU -> Linear), forward + backward, on every cell of this step's
    # padded (rows, positions) grid (what a plain run pays) and on its scored cells only (the least a loss
    # needs): how much of the step the head can cost.
    head_ms = {}
    for t_index, entry in enumerate(problem.models):
        model = entry.model
        head = getattr(model, "head", None)
        if head is None:
            continue
        chunks = [c for c in problem.splits["train"] if c.trained and c.target == t_index]
        views = [c.batch(rows[2]) for c in chunks]
        width = max(v.input_ids.shape[1] for v in views)
        scored = sum(int((v.labels != IGNORE).sum()) for v in views)
        for label, n_cells in (("all_cells", len(chunks) * batch * width), ("scored_cells", scored)):
            x = torch.randn(n_cells, model.d_model, requires_grad=True)
            samples = []
            for _ in range(steps):
                t0 = time.perf_counter()
                head(x).sum().backward()
                samples.append(time.perf_counter() - t0)
                x.grad = None
            head_ms[f"{entry.name}:{label}({n_cells})"] = 1e3 * median(samples)

    profiler = cProfile.Profile()
    profiler.enable()
    for r in rows[2:]:
        mas_step(trainer, r)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
    return {"batch": batch, "steps": steps, "top_ops": ops, "op_table": table, "phase_ms": phase_ms,
            "head_forward_backward_ms": head_ms, "cprofile_top": stream.getvalue(),
            "alignment_ms": alignment_cost(problem.models[0].width, K, repeats=steps)}


def profile_setup(config: dict, n_train: int, n_valid: int) -> dict:
    """cProfile of one NumericProblem construction: the shares of latent collection, pair building, the
    standardisation statistics and the rest (by cumulative time of the functions that do them)."""
    entries = make_entries(config["archs"], config["site"])
    profiler = cProfile.Profile()
    profiler.enable()
    build_problem(entries, config["stepwise"], n_train, n_valid)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(v[3] for v in stats.stats.values())

    def cumulative(funcname: str, file_part: str = "") -> float:
        return sum(v[3] for (file, _, name), v in stats.stats.items() if name == funcname and file_part in file)

    parts = {
        "latent collection (_collect: model forward at every position)": cumulative("_collect", "numeric"),
        "  of which the GRU kernel (torch.gru)": cumulative("<built-in method torch.gru>"),
        "  of which Linear layers (RNN head / Transformer)": cumulative("<built-in method torch._C._nn.linear>"),
        "  of which GELU": cumulative("<built-in method torch._C._nn.gelu>"),
        "make_pairs": cumulative("make_pairs", "pairs"),
        "latent std for standardisation (Tensor.std)": cumulative("<method 'std' of 'torch._C.TensorBase' objects>"),
    }
    stream = io.StringIO()
    stats.stream = stream
    stats.sort_stats("cumulative").print_stats(20)
    return {"total_s": total, "seconds": parts, "shares": {k: v / total for k, v in parts.items()},
            "cprofile_top": stream.getvalue()}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and few repeats (smoke test)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts (default 1 and 2; --quick: 1)")
    parser.add_argument("--multi-thread-configs", nargs="+", default=["gru-gru-hidden-indywise"],
                        choices=list(CONFIGS),
                        help="configs also run with more than 1 thread (2 threads on 2 loaded cores is slow)")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--name", default="numeric_mas",
                        help="result file bench/results/<name>.json (e.g. numeric_mas_headline_quiet for a re-run "
                             "of the headline figure on an idle machine, which run_all reports beside the main one)")
    args = parser.parse_args(argv)
    n_train, n_valid = (1000, 200) if args.quick else (10_000, 1000)
    threads_list = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (2 if args.quick else 7)
    print(f"numeric MAS bench: n_train {n_train}, n_valid {n_valid}, k {K}, repeats {repeats}, "
          f"load {os.getloadavg()}")
    result: dict = {"n_train": n_train, "n_valid": n_valid, "k": K, "repeats": repeats,
                    "machine_start": machine_info(), "setup": {}, "steps": {}, "eval": {}, "profile": {}}

    set_threads(1)
    for name in args.configs:
        result["setup"][name] = time_setup(CONFIGS[name], n_train, n_valid, repeats=1 if args.quick else 2)
        s = result["setup"][name]
        print(f"[setup] {name}: sample {s['sample_s']:.2f}s, make_pairs {s['make_pairs_s']:.2f}s "
              f"({s['n_pairs']} pairs), whole NumericProblem {s['problem_setup_s']:.2f}s")

    problems = {}
    for name in args.configs:
        cfg = CONFIGS[name]
        entries = make_entries(cfg["archs"], cfg["site"])
        problem = build_problem(entries, cfg["stepwise"], n_train, n_valid)
        full = problem
        if any(c.fast for c in problem.splits["train"]):
            # The bare step needs the full counterfactual sequences; the fast path stores only the part from
            # the intervened token on. Same seed -> the same pairs.
            full = build_problem(entries, cfg["stepwise"], n_train, n_valid, fast_path=False)
        problems[name] = (problem, full)

    for threads in threads_list:
        set_threads(threads)
        key = f"threads={threads}"
        result["steps"][key] = {}
        result["eval"][key] = {}
        configs = args.configs if threads == 1 else [c for c in args.configs if c in args.multi_thread_configs]
        rounds = repeats if threads == 1 else max(2, repeats // 2)
        for name in configs:
            problem, full = problems[name]
            result["steps"][key][name] = {}
            for batch in args.batches:
                r = bench_steps(problem, full, batch, rounds)
                result["steps"][key][name][str(batch)] = r
                extra = (f", full run {r['mas-full-run']['median_s']:.3f}s "
                         f"(x{r['full_run_overhead_ratio']['median']:.2f} bare)" if "mas-full-run" in r else "")
                print(f"[step] {key} {name} batch {batch}: MAS {r['mas']['median_s']:.3f}s/step "
                      f"({r['mas']['pairs_per_s']:.0f} pairs/s), bare {r['bare']['median_s']:.3f}s, "
                      f"overhead x{r['overhead_ratio']['median']:.2f}{extra}; load {r['loadavg_after'][0]:.1f}")
            ev = bench_eval(problem, repeats=1 if args.quick else 3)
            result["eval"][key][name] = ev
            print(f"[eval] {key} {name}: {ev['median_s']:.2f}s for {ev['n_pairs']} pairs "
                  f"({ev['pairs_per_s']:.0f} pairs/s)")

    if not args.no_profile:
        set_threads(1)
        for name in args.configs:
            prof = profile_step(problems[name][0], 128, steps=3 if args.quick else 8)
            result["profile"][name] = prof
            print(f"\n[profile] {name}, batch 128, 1 thread: phases (ms) "
                  + ", ".join(f"{k} {v:.1f}" for k, v in prof["phase_ms"].items())
                  + "; head fwd+bwd alone (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                            prof["head_forward_backward_ms"].items())
                  + "; one alignment materialize+backward (ms) "
                  + ", ".join(f"{k} {v:.1f}" for k, v in prof["alignment_ms"].items()))
            print(prof["op_table"])

        for name in args.configs:
            if name == "gru-gru-embeddings-stepwise":
                continue  # same models and collection as the indywise GRU pair
            prof = profile_setup(CONFIGS[name], n_train, n_valid)
            result["profile"][f"setup:{name}"] = prof
            print(f"\n[profile] NumericProblem set-up, {name}: {prof['total_s']:.1f}s; "
                  + "; ".join(f"{k} {100 * v:.0f}%" for k, v in prof["shares"].items()))

    report(result)
    write_result(args.name, result)
    return result


def report(result: dict) -> None:
    rows = []
    for key, per_config in result["steps"].items():
        for name, per_batch in per_config.items():
            for batch, r in per_batch.items():
                rows.append([key, name, batch, r["mas"]["median_s"], r["mas"]["cpu_median_s"],
                             r["mas"]["pairs_per_s"], r["bare"]["median_s"], r["overhead_ratio"]["median"],
                             r["overhead_ratio_cpu"]["median"],
                             r.get("full_run_overhead_ratio", {}).get("median", "-"),
                             f"{r['loadavg_before']:.1f}-{r['loadavg_after'][0]:.1f}"])
    print_table("MAS training step (medians; ratios = medians of interleaved per-round ratios)",
                ["threads", "config", "batch", "wall s/step", "CPU s/step", "pairs/s", "bare s", "MAS/bare",
                 "MAS/bare CPU", "full-run/bare", "load1"], rows)
    rows = [[key, name, r["median_s"], r["cpu_median_s"], r["pairs_per_s"], r["loadavg_after"][0]]
            for key, per in result["eval"].items() for name, r in per.items()]
    print_table("Evaluation (teacher forced + rollout, validation split)",
                ["threads", "config", "wall s", "CPU s", "pairs/s (wall)", "load1"], rows)
    rows = []
    for name, s in result["setup"].items():
        rows.append([name, s["n_pairs"], s["sample_s"], s["make_pairs_s"], s["make_pairs_cpu_s"],
                     s["problem_setup_s"], s["problem_setup_cpu_s"],
                     s["loadavg_after"][0]])
    print_table("Set-up, 4 directions x (n_train + n_valid), 1 thread",
                ["config", "pairs", "sample s", "make_pairs s", "make_pairs CPU s", "TaskModelProblem s",
                 "TaskModelProblem CPU s", "load1"], rows)


if __name__ == "__main__":
    main(sys.argv[1:])
