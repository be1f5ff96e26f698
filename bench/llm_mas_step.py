"""One stepwise LLM MAS training step through `LLMProblem` (what `llm-mas mas` runs) at a middle-layer site:
the whole model every step against steps that start at the site (``skip_below_site``).

    python bench/llm_mas_step.py                  # 256-d/4-layer and 512-d/8-layer Qwen2s, 1 thread
    python bench/llm_mas_step.py --quick          # smoke test
    python bench/llm_mas_step.py --sizes 512d-8L --backends torch   # the torch variants only (own results file)

Two random-weight Qwen2s of the sizes of bench/pyvene_das.py (built offline, seeds 0 and 1), each recorded on
the tiny corpus (40 prompts of 16 tokens, greedy to 64), site ``layer{L/2}``, k = d/2, every direction
trained (4 directions, 2 target passes), batch 8 pairs per direction, Adam. One process, one problem per
backend (torch hooks, nnsight); the variants of a backend share its models, pairs and alignment start:
- full: ``skip_below_site=False``: every step runs the target's layers 0..L with the edit inside;
- site: the default: the pairs' layer-l outputs come from the per-pair cache (filled before timing, over
  every train pair: ``cache_fill_s``; its size ``cache_mib``), a step runs layers l+1.. and the head;
- nocache: as site with ``site_cache_bytes=0``, the fallback past the cache budget and what a
  step of the first epoch costs: layers 0..l run without a graph at each step, then as site;
- disk: as nocache but with a disk budget for every pair (``site_disk_bytes``): the pairs'
  layer-l outputs written to files once (filled before timing, over every train pair: ``disk_fill_s``)
  and read back at each step.
Variants interleaved round by round; ratios are medians of per-round ratios. Resident memory (MiB) is read
after the full steps and after the cache is filled. Writes bench/results/llm_mas_step.json (with
``--backends torch``: llm_mas_step_torch.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import (  # noqa: E402
    MIDDLE_LAYER_SIZES,
    interleaved,
    machine_info,
    median,
    print_table,
    ratio,
    set_threads,
    write_result,
)

from llm_mas.resources import peak_resident_mib, resident_mib  # noqa: E402

SIZES = MIDDLE_LAYER_SIZES
BACKENDS = ("torch", "nnsight")
DISK_BYTES = 1 << 30      # every pair of the disk variant (4 directions × 80 pairs × 64 × 512 × 4 B = 40 MiB)
N_TRAIN, N_VALID, BATCH = 64, 16, 8


def _models(size: str, root: Path) -> list[tuple[str, str]]:
    """(model directory, recording directory) of the two models."""
    from transformers.utils import logging as hf_logging

    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import build_tiny_qwen2, tiny_corpus, tiny_qwen2_config

    hf_logging.disable_progress_bar()
    out = []
    for seed in (0, 1):
        path = build_tiny_qwen2(root / f"m{seed}", seed=seed,
                                config=tiny_qwen2_config(max_position_embeddings=256, **SIZES[size]))
        model, tokenizer = load_causal_lm(path)
        record_generations(model, tokenizer, tiny_corpus(80, seed=5), prompt_len=16, total_len=64, n=40,
                           batch_size=20, progress=False).save(root / f"rec{seed}")
        out.append((str(path), str(root / f"rec{seed}")))
    return out


def _fill(problem) -> float:
    """Seconds to read every train pair's site output once (what a run's first epoch does): fills its caches."""
    t0 = time.perf_counter()
    for d in problem.splits["train"]:
        problem._site_outputs(d, "train", torch.arange(N_TRAIN), problem.resumes[d.target])
    return time.perf_counter() - t0


def bench_size(size: str, repeats: int, backends: tuple[str, ...] = BACKENDS) -> dict:
    from llm_mas.problems.llm import LLMProblem
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import config_from_kwargs

    root = Path(tempfile.mkdtemp(prefix="llm_mas_step_"))
    try:
        pairs = _models(size, root)
        layer = SIZES[size]["n_layers"] // 2
        steps, problems, out = {}, {}, {"layer": layer, "backends": {}}
        for backend in backends:
            config = config_from_kwargs(
                models=[dict(name=m, kind="hf", recording=r, site=f"layer{layer}", backend=backend) for m, r in pairs],
                data={"n_train": N_TRAIN, "n_valid": N_VALID, "stepwise": True}, train={"batch_size": BATCH},
                progress=False)
            site = build_problem(config)
            full = LLMProblem(site.models, site.k, n_train=N_TRAIN, n_valid=N_VALID, seed=config.seed,
                              eval_batch_size=config.eval.batch_size, skip_below_site=False)
            assert all(r is not None for r in site.resumes), "the self-check refused the model"
            variants = [(f"{backend}-full", full), (f"{backend}-site", site)]
            for tier, disk_bytes in (("nocache", 0), ("disk", DISK_BYTES)):
                variants.append((f"{backend}-{tier}", LLMProblem(
                    site.models, site.k, n_train=N_TRAIN, n_valid=N_VALID, seed=config.seed, site_cache_bytes=0,
                    site_disk_bytes=disk_bytes, eval_batch_size=config.eval.batch_size)))
            for name, problem in variants:
                alignments = build_alignments(config, problem)
                optimizer = torch.optim.Adam(alignments.parameters(), lr=1e-3)
                generator = torch.Generator().manual_seed(0)
                losses: list[float] = []

                def step(problem=problem, alignments=alignments, optimizer=optimizer, generator=generator,
                         losses=losses):
                    optimizer.zero_grad(set_to_none=True)
                    rows = torch.randperm(N_TRAIN, generator=generator)[:BATCH]
                    loss, _ = problem.loss([a.materialize() for a in alignments], rows)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))

                steps[name], problems[name] = (step, losses), problem
            out["backends"][backend] = {"rss_mib_built": resident_mib()}
        for backend in backends:  # fill the caches over every train pair (what the first epoch does)
            site = problems[f"{backend}-site"]
            out["backends"][backend].update(cache_fill_s=_fill(site),
                                            cache_mib=site.cached_site_bytes / 2**20, rss_mib_cached=resident_mib())
        for backend in backends:  # the same over the disk variant's files
            disk = problems[f"{backend}-disk"]
            out["backends"][backend].update(disk_fill_s=_fill(disk), disk_mib=disk.spilled_site_bytes / 2**20)
        cpu: dict[str, list[float]] = {}
        times = interleaved({name: fn for name, (fn, _) in steps.items()}, repeats=repeats, warmup=1, cpu=cpu)
        for backend in backends:
            r = out["backends"][backend]
            for v in ("full", "site"):
                r[v] = {"median_ms": 1e3 * median(times[f"{backend}-{v}"]),
                        "cpu_median_ms": 1e3 * median(cpu[f"{backend}-{v}"]),
                        "first_loss": steps[f"{backend}-{v}"][1][0]}
            r["full/site"] = ratio(times, f"{backend}-full", f"{backend}-site")
            r["full/site_cpu"] = ratio(cpu, f"{backend}-full", f"{backend}-site")
            r["first_loss_rel_diff"] = abs(r["full"]["first_loss"] - r["site"]["first_loss"]) / r["full"]["first_loss"]
            for v in ("nocache", "disk"):
                r[v] = {"median_ms": 1e3 * median(times[f"{backend}-{v}"]),
                        "cpu_median_ms": 1e3 * median(cpu[f"{backend}-{v}"]),
                        "first_loss": steps[f"{backend}-{v}"][1][0]}
            r["full/nocache"] = ratio(times, f"{backend}-full", f"{backend}-nocache")
            r["nocache/disk"] = ratio(times, f"{backend}-nocache", f"{backend}-disk")
            r["nocache/disk_cpu"] = ratio(cpu, f"{backend}-nocache", f"{backend}-disk")
            r["disk/site"] = ratio(times, f"{backend}-disk", f"{backend}-site")
        out.update(times_s=times, cpu_times_s=cpu, peak_rss_mib=peak_resident_mib(),
                   parameters=sum(p.numel() for p in problems[f"{backends[0]}-full"].models[0].model.parameters()),
                   loadavg_after=list(os.getloadavg()))
        print(f"[llm mas step] {size}: " + ", ".join(
            f"{b} full {out['backends'][b]['full']['median_ms']:.0f}ms site {out['backends'][b]['site']['median_ms']:.0f}ms"
            f" (x{out['backends'][b]['full/site']['median']:.2f})" for b in backends))
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parser.parse_args(argv)
    set_threads(1)
    sizes = args.sizes or (["64d-2L"] if args.quick else ["256d-4L", "512d-8L"])
    repeats = args.repeats or (2 if args.quick else 7)
    result = {"machine_start": machine_info(), "threads": 1, "batch_per_direction": BATCH, "directions": 4,
              "sizes": {size: bench_size(size, repeats, tuple(args.backends)) for size in sizes}}
    rows = [[size, r["layer"], b, x["full"]["median_ms"], x["site"]["median_ms"], x["full/site"]["median"],
             x["full/site_cpu"]["median"], x["full/nocache"]["median"],
             x["nocache/disk"]["median"], x["nocache/disk_cpu"]["median"],
             x["cache_fill_s"], x["disk_fill_s"], x["cache_mib"], x["rss_mib_built"], x["rss_mib_cached"],
             x["first_loss_rel_diff"]]
            for size, r in result["sizes"].items() for b, x in r["backends"].items()]
    print_table("LLM MAS step at a middle layer (2 models, 4 directions, 8 pairs each, 1 thread), ms medians",
                ["model", "layer", "backend", "full ms", "site ms", "full/site", "full/site CPU", "full/nocache",
                 "nocache/disk", "nocache/disk CPU", "cache fill s", "disk fill s", "cache MiB", "RSS built",
                 "RSS cached", "first-loss rel diff"], rows)
    if not args.quick:
        write_result("llm_mas_step" if tuple(args.backends) == BACKENDS else "llm_mas_step_" + "_".join(args.backends),
                     result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
