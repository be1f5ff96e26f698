"""One DAS training step through llm_mas (torch hooks, nnsight) and through pyvene, on the same model.

    python bench/pyvene_das.py                 # 256-d/4-layer and 512-d/8-layer Qwen2 and Llama, 1 thread
    python bench/pyvene_das.py --quick         # smoke test (tiny sizes, 2 rounds)
    python bench/pyvene_das.py --families llama --sizes 512d-8L

The step: the source batch runs without an intervention, the base batch runs with its latents at the
output of the middle decoder layer replaced, at 4 positions per row (different positions in base and
source), by a rotation-space interchange of the first k = 16 coordinates; cross-entropy of the last
position's logits against fixed random labels; backward; one Adam step on the rotation.
- ours-hooks / ours-nnsight: `OrthogonalAlignment` (matrix exponential) + `interventions.intervene` as an
  `Edit` through `TorchHookBackend.patch` / `NNsightBackend.patch`; the source latents come from
  `collect` under no_grad in the same step.
- ours-resume: the step starts at the intervened layer (`llm_mas.backends.resume.LayerResume`): the frozen
  model's output of the middle layer on the base batch and the source latents at the source positions
  do not depend on the rotation, so they are computed once (no_grad; the one-off cost is reported as
  `resume_cache_ms`) and each step runs the layers above the site (and the head on the last position,
  the only one the loss reads) from them.
- pyvene: `RotatedSpaceIntervention(keep_last_dim=True)` (torch's orthogonal parametrisation, matrix
  exponential for a square matrix) in an `IntervenableModel`, sources passed in the same call.
Both rotations start from the same matrix. Variants are interleaved round by round (rotating order);
ratios are medians of per-round ratios. Models are random-weight Qwen2s (saved and loaded through
`load_causal_lm`) or Llamas (built in memory) of the same sizes, offline from a config; all in one process.
Writes bench/results/pyvene_das.json.
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
import torch.nn.functional as F  # noqa: E402
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

from llm_mas.alignments import make_alignment  # noqa: E402
from llm_mas.backends import Edit, get_backend  # noqa: E402
from llm_mas.backends.resume import LayerResume  # noqa: E402
from llm_mas.interventions import intervene  # noqa: E402
from llm_mas.sites import Site  # noqa: E402

SIZES = MIDDLE_LAYER_SIZES
VARIANTS = ("ours-hooks", "ours-nnsight", "ours-resume", "pyvene")
POSITIONS_PER_ROW = 4


FAMILIES = ("qwen2", "llama")


def build(size: str, root: Path, family: str = "qwen2"):
    from transformers.utils import logging as hf_logging

    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.tiny import build_tiny_qwen2, tiny_qwen2_config

    hf_logging.disable_progress_bar()
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        s = SIZES[size]
        config = LlamaConfig(vocab_size=512, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                             num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                             num_key_value_heads=s["n_kv_heads"], max_position_embeddings=256,
                             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
        return model.requires_grad_(False)
    config = tiny_qwen2_config(max_position_embeddings=256, **SIZES[size])
    return load_causal_lm(build_tiny_qwen2(root / size, seed=0, config=config))[0]


class DASStep:
    def __init__(self, size: str, batch: int, length: int, k: int, root: Path, family: str = "qwen2"):
        import pyvene as pv

        self.model = build(size, root, family)
        config = self.model.config
        self.d, self.k, self.layer = config.hidden_size, k, config.num_hidden_layers // 2
        g = torch.Generator().manual_seed(0)
        self.base = torch.randint(3, config.vocab_size, (batch, length), generator=g)
        self.source = torch.randint(3, config.vocab_size, (batch, length), generator=g)
        self.labels = torch.randint(3, config.vocab_size, (batch,), generator=g)
        base_pos = torch.stack([torch.randperm(length, generator=g)[:POSITIONS_PER_ROW].sort().values
                                for _ in range(batch)])  # (B, P) sorted: row-major entry order
        source_pos = torch.stack([torch.randperm(length, generator=g)[:POSITIONS_PER_ROW] for _ in range(batch)])
        self.base_pos, self.source_pos = base_pos.tolist(), source_pos.tolist()
        self.mask = torch.zeros(batch, length, dtype=torch.bool)
        self.mask[torch.arange(batch)[:, None], base_pos] = True
        self.source_pos_t = source_pos
        self.site = Site.parse(f"layer{self.layer}")
        self.backends = {"ours-hooks": get_backend("torch"), "ours-nnsight": get_backend("nnsight")}
        self.alignments = {v: make_alignment("orthogonal", self.d, k=k, seed=0)
                           for v in (*self.backends, "ours-resume")}
        t0 = time.perf_counter()
        self.resume = LayerResume(self.model, self.layer)
        self.base_h = self.resume.collect(self.base)                                          # (B, T, d)
        self.resume_entries = self.resume.collect(self.source)[torch.arange(batch)[:, None], source_pos].reshape(
            -1, self.d)                                                                        # (B·P, d)
        self.resume_cache_ms = 1e3 * (time.perf_counter() - t0)
        self.optimizers = {v: torch.optim.Adam(a.parameters(), lr=1e-3) for v, a in self.alignments.items()}
        intervention = pv.RotatedSpaceIntervention(embed_dim=self.d, keep_last_dim=True)
        intervention.set_interchange_dim(k)
        ours = self.alignments["ours-hooks"].linear.parametrizations.weight
        theirs = intervention.rotate_layer.parametrizations.weight
        with torch.no_grad():
            theirs.original.copy_(ours.original)
            theirs[0].base.copy_(ours[0].base)
        self.pyvene = pv.IntervenableModel(pv.IntervenableConfig(representations=[pv.RepresentationConfig(
            layer=self.layer, component="block_output", unit="pos", max_number_of_units=POSITIONS_PER_ROW,
            intervention=intervention)]), self.model)
        self.intervention = intervention
        self.optimizers["pyvene"] = torch.optim.Adam(intervention.parameters(), lr=1e-3)
        self.losses: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def step(self, variant: str) -> None:
        optimizer = self.optimizers[variant]
        optimizer.zero_grad(set_to_none=True)
        if variant == "ours-resume":
            amap = self.alignments[variant].materialize()
            h = self.base_h.clone()
            h[self.mask] = intervene(amap, amap, self.base_h[self.mask], self.resume_entries, slice(0, self.k))
            logits = self.resume(h, self.base, keep_last=1)
        elif variant == "pyvene":
            _, out = self.pyvene({"input_ids": self.base}, [{"input_ids": self.source}],
                                 unit_locations={"sources->base": ([self.source_pos], [self.base_pos])})
            logits = out.logits
        else:
            backend = self.backends[variant]
            with torch.no_grad():
                latents = backend.collect(self.model, {"input_ids": self.source}, [self.site])
            source_latents = next(iter(latents.values()))  # (B, T, d)
            rows = torch.arange(len(self.base))[:, None]
            entries = source_latents[rows, self.source_pos_t].reshape(-1, self.d)  # (B·P, d), row-major
            amap = self.alignments[variant].materialize()
            block = slice(0, self.k)

            def edit_fn(h, which):
                return intervene(amap, amap, h, entries[which], block)

            logits = backend.patch(self.model, {"input_ids": self.base}, [Edit(self.site, self.mask, edit_fn)])
        loss = F.cross_entropy(logits[:, -1], self.labels)
        loss.backward()
        optimizer.step()
        self.losses[variant].append(float(loss.detach()))


def bench_size(size: str, batch: int, length: int, k: int, repeats: int, family: str = "qwen2") -> dict:
    root = Path(tempfile.mkdtemp(prefix="llm_mas_pyvene_"))
    try:
        bench = DASStep(size, batch, length, k, root, family)
        cpu: dict[str, list[float]] = {}
        times = interleaved({v: (lambda v=v: bench.step(v)) for v in VARIANTS}, repeats=repeats, warmup=1, cpu=cpu)
        out = {"d": bench.d, "layers": bench.model.config.num_hidden_layers, "layer": bench.layer,
               "parameters": sum(p.numel() for p in bench.model.parameters()), "batch": batch, "length": length,
               "k": k, "positions_per_row": POSITIONS_PER_ROW, "times_s": times, "cpu_times_s": cpu,
               "loadavg_after": list(os.getloadavg())}
        for v in VARIANTS:
            out[v] = {"median_ms": 1e3 * median(times[v]), "cpu_median_ms": 1e3 * median(cpu[v])}
        out["pyvene/ours-hooks"] = ratio(times, "pyvene", "ours-hooks")
        out["pyvene/ours-nnsight"] = ratio(times, "pyvene", "ours-nnsight")
        out["pyvene/ours-resume"] = ratio(times, "pyvene", "ours-resume")
        out["pyvene/ours-resume_cpu"] = ratio(cpu, "pyvene", "ours-resume")
        out["resume_cache_ms"] = bench.resume_cache_ms
        out["pyvene/ours-hooks_cpu"] = ratio(cpu, "pyvene", "ours-hooks")
        out["pyvene/ours-nnsight_cpu"] = ratio(cpu, "pyvene", "ours-nnsight")
        # same start, same data: the first loss of every variant is the same number
        firsts = [bench.losses[v][0] for v in VARIANTS]
        out["first_loss"] = dict(zip(VARIANTS, firsts))
        out["first_loss_max_diff"] = max(firsts) - min(firsts)
        print(f"[pyvene das] {family} {size}: " + ", ".join(f"{v} {out[v]['median_ms']:.0f}ms" for v in VARIANTS)
              + f"; pyvene/hooks x{out['pyvene/ours-hooks']['median']:.2f}, "
              f"pyvene/resume x{out['pyvene/ours-resume']['median']:.2f}, "
              f"pyvene/nnsight x{out['pyvene/ours-nnsight']['median']:.2f}")
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args(argv)
    set_threads(1)
    sizes = args.sizes or (["64d-2L"] if args.quick else ["256d-4L", "512d-8L"])
    repeats = args.repeats or (2 if args.quick else 7)
    result = {"machine_start": machine_info(), "threads": 1, "sizes": {}}
    import pyvene

    result["pyvene_version"] = getattr(pyvene, "__version__", "0.1.8")
    for family in args.families:
        for size in sizes:
            key = size if family == "qwen2" else f"{family} {size}"
            result["sizes"][key] = bench_size(size, args.batch, args.length, args.k, repeats, family)
    rows = [[size] + [r[v]["median_ms"] for v in VARIANTS] + [r["pyvene/ours-hooks"]["median"],
                                                              r["pyvene/ours-nnsight"]["median"],
                                                              r["pyvene/ours-resume"]["median"],
                                                              r["pyvene/ours-hooks_cpu"]["median"],
                                                              r["pyvene/ours-resume_cpu"]["median"],
                                                              r["first_loss_max_diff"]]
            for size, r in result["sizes"].items()]
    print_table(f"DAS step (B={args.batch}, T={args.length}, k={args.k}, 1 thread), ms medians",
                ["model"] + [f"{v} ms" for v in VARIANTS] + ["pyvene/hooks", "pyvene/nnsight", "pyvene/resume",
                                                             "pyvene/hooks CPU", "pyvene/resume CPU",
                                                             "first-loss diff"], rows)
    if not args.quick:
        write_result("pyvene_das", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
