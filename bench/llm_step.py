"""One stepwise LLM MAS training step through plain torch hooks, nnsight and TransformerLens.

    python bench/llm_step.py                    # tiny and mid-size Qwen2, 1 and 2 torch threads
    python bench/llm_step.py --quick            # smoke test
    python bench/llm_step.py --sizes mid --threads 2

The step (docs/method.md §14, built here from backends + alignments + interchange.intervene, not from
llm_mas.problems.llm): the source model's embedding-layer latents are cached once (no grad); per step both
orthogonal alignments (k = d/2) are materialized, the target runs with its embeddings at positions 0..i
(i ~ U[10, L-10) per row) replaced by ``intervene(A_t, A_s, h_t, h_s, [0, k))``, its inputs after i are the
source's tokens, the loss is the cross-entropy against the source model's greedy predictions at positions
>= i, then backward and one Adam step on the two alignments.

Variants, interleaved round by round:
- hooks:   ``TorchHookBackend.patch`` on the Hugging Face model (forward hooks);
- nnsight: ``NNsightBackend.patch`` on the same model (one nnsight trace per step);
- tlens:   ``TLensBackend.patch`` on a ``HookedTransformer`` converted offline from the same weights
           (TransformerLens' own attention/MLP code, so TL/hooks measures the model code as well as hooks);
- raw-hook: one hand-written ``register_forward_hook`` doing the same edit (what the Edit machinery costs);
- hooks-cayley: as hooks, with the alignments' orthogonal map switched from the matrix exponential (default)
           to the Cayley transform (what the parametrisation costs; ``alignment_ms`` times it alone);
- bare:    plain HF ``model(ids)`` + the same CE + backward into the embedding table (no edit, no Adam):
           the floor that any MAS step pays.
Models: the tiny Qwen2 (d 64, 2 layers) and a random-weight mid-size Qwen2 from ``mid_size_qwen2_config()``
(d 512, 8 layers, ~24 M parameters).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
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

from llm_mas.alignments import make_alignment  # noqa: E402
from llm_mas.backends import Edit, TorchHookBackend, get_backend  # noqa: E402
from llm_mas.interventions import intervene  # noqa: E402
from llm_mas.sites import Site  # noqa: E402

IGNORE = -100
SIZES = {
    "tiny": {"batch": 16, "length": 96},
    "mid": {"batch": 8, "length": 96},
}
VARIANTS = ("hooks", "nnsight", "tlens", "raw-hook", "hooks-cayley", "bare")


def build_model(size: str, seed: int, root: Path):
    """(model, tokenizer) of the tiny or the mid-size Qwen2, built offline and loaded by load_causal_lm."""
    from transformers.utils import logging as hf_logging

    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.tiny import build_tiny_qwen2, mid_size_qwen2_config

    hf_logging.disable_progress_bar()
    config = mid_size_qwen2_config() if size == "mid" else None
    path = build_tiny_qwen2(root / f"{size}-{seed}", seed=seed, config=config)
    return load_causal_lm(path)


class LLMStep:
    """Models, cached source latents, batch and one step function per variant."""

    def __init__(self, size: str, batch: int, length: int, variants=VARIANTS, seed: int = 0):
        self.root = Path(tempfile.mkdtemp(prefix="llm_mas_bench_"))
        self.size = size
        self.target, self.tokenizer = build_model(size, seed, self.root)
        source, _ = build_model(size, seed + 1, self.root)
        d = self.target.config.hidden_size
        self.d, self.k = d, d // 2
        vocab = self.target.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        source_ids = torch.randint(0, vocab, (batch, length), generator=g)     # (B, L)
        target_ids = torch.randint(0, vocab, (batch, length), generator=g)     # (B, L)
        index = torch.randint(10, length - 10, (batch,), generator=g)          # (B,) i per row
        col = torch.arange(length)
        self.mask = col[None, :] <= index[:, None]                             # (B, L) positions 0..i
        self.ids = torch.where(self.mask, target_ids, source_ids)              # inputs after i: the source's
        hooks = TorchHookBackend()
        self.site = Site.parse("embeddings")  # every backend resolves the alias for its own model
        self.hf_site = hooks.resolve(self.target, self.site)
        with torch.no_grad():
            source_site = hooks.resolve(source, "embeddings")
            latents = hooks.collect(source, {"input_ids": source_ids}, [source_site])[str(source_site)]
            predictions = source(source_ids).logits.argmax(-1)                 # (B, L) greedy next tokens
        self.source_entries = latents[self.mask]                               # (entries, d), row-major
        self.labels = torch.where(col[None, :] >= index[:, None], predictions, torch.full_like(predictions, IGNORE))
        del source
        self.block = slice(0, self.k)
        self.backends = {"hooks": hooks}
        self.backends["hooks-cayley"] = hooks
        self.models = {"hooks": self.target, "raw-hook": self.target, "hooks-cayley": self.target,
                       "bare": self.target}
        if "nnsight" in variants:
            self.backends["nnsight"] = get_backend("nnsight")
            self.models["nnsight"] = self.target
        if "tlens" in variants:
            from llm_mas.backends.tlens_backend import to_hooked_transformer

            self.backends["tlens"] = get_backend("tlens")
            self.models["tlens"] = to_hooked_transformer(self.target, self.tokenizer)
        self.optimizers = {}
        self.alignments = {}
        for name in variants:
            if name == "bare":
                continue
            options = {"orthogonal_map": "cayley"} if name == "hooks-cayley" else {}
            alignments = torch.nn.ModuleList(
                [make_alignment("orthogonal", d, k=self.k, seed=i, **options) for i in range(2)])
            self.alignments[name] = alignments  # [source, target]
            self.optimizers[name] = torch.optim.Adam(alignments.parameters(), lr=1e-3)
        self.first_loss: dict[str, float] = {}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _loss(self, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), self.labels.flatten(), ignore_index=IGNORE)

    def step(self, name: str) -> float:
        if name == "bare":
            return self.bare_step()
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        source_map, target_map = (a.materialize() for a in self.alignments[name])
        entries, block = self.source_entries, self.block

        def edit_fn(h, which):  # h (n, d) target embeddings at the masked positions
            return intervene(target_map, source_map, h, entries[which], block)

        if name == "raw-hook":
            module = self.target.get_submodule(self.hf_site.module)

            def hook(mod, args, output):  # output (B, L, d)
                new = output.clone()
                new[self.mask] = intervene(target_map, source_map, output[self.mask], entries, block)
                return new

            handle = module.register_forward_hook(hook)
            try:
                logits = self.target(self.ids).logits
            finally:
                handle.remove()
        else:
            edit = Edit(site=self.site, mask=self.mask, fn=edit_fn)
            logits = self.backends[name].patch(self.models[name], {"input_ids": self.ids}, [edit])  # (B, L, V)
        loss = self._loss(logits)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        self.first_loss.setdefault(name, value)
        return value

    def bare_step(self) -> float:
        weight = self.target.get_input_embeddings().weight
        weight.requires_grad_(True)
        try:
            loss = self._loss(self.target(self.ids).logits)
            loss.backward()
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        return float(loss.detach())


def bench_size(size: str, threads_list, repeats: int, variants=VARIANTS) -> dict:
    spec = SIZES[size]
    bench = LLMStep(size, spec["batch"], spec["length"], variants)
    out = {"batch": spec["batch"], "length": spec["length"], "d": bench.d, "k": bench.k,
           "parameters": sum(p.numel() for p in bench.target.parameters()), "threads": {}}
    try:
        for threads in threads_list:
            set_threads(threads)
            rounds = repeats if threads == 1 else max(2, repeats // 2)  # 2 threads on 2 loaded cores is slow
            load_before = os.getloadavg()[0]
            cpu: dict[str, list[float]] = {}
            times = interleaved({v: (lambda v=v: bench.step(v)) for v in variants}, repeats=rounds, warmup=1,
                                cpu=cpu)
            r = {"times_s": times, "cpu_times_s": cpu, "loadavg_before": load_before,
                 "loadavg_after": list(os.getloadavg())}
            for v, ts in times.items():
                r[v] = {**timing_summary(ts), "cpu_median_s": median(cpu[v])}
            for v in variants:
                if v != "hooks":
                    r[f"{v}/hooks"] = ratio(times, v, "hooks")
            r["hooks/bare"] = ratio(times, "hooks", "bare")
            r["nnsight/hooks_cpu"] = ratio(cpu, "nnsight", "hooks") if "nnsight" in cpu else None
            out["threads"][str(threads)] = r
            print(f"[llm step] {size} threads {threads}: " + ", ".join(
                f"{v} {r[v]['median_s'] * 1e3:.1f}ms" for v in variants)
                + f"; nnsight/hooks x{r.get('nnsight/hooks', {}).get('median', float('nan')):.3f}"
                + f", tlens/hooks x{r.get('tlens/hooks', {}).get('median', float('nan')):.3f}"
                + f"; load {r['loadavg_after'][0]:.1f}")
        set_threads(1)
        out["alignment_ms_1thread"] = alignment_cost(bench.d, bench.k, repeats=5)
        print(f"[llm step] {size}: one orthogonal alignment, materialize + backward, 1 thread: "
              + ", ".join(f"{m} {v:.1f}ms" for m, v in out["alignment_ms_1thread"].items()))
        losses = {k: v for k, v in bench.first_loss.items() if k != "hooks-cayley"}
        out["first_step_loss"] = losses
        out["first_step_loss_max_diff"] = max(losses.values()) - min(losses.values()) if losses else None
    finally:
        bench.close()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts (default 1 and 2; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    result = {"machine_start": machine_info(), "sizes": {}}
    threads_list = args.threads or ([1] if args.quick else [1, 2])
    for size in args.sizes:
        repeats = args.repeats or (2 if args.quick else (7 if size == "mid" else 15))
        result["sizes"][size] = bench_size(size, threads_list, repeats)
    rows = []
    for size, r in result["sizes"].items():
        for threads, t in r["threads"].items():
            rows.append([size, threads] + [1e3 * t[v]["median_s"] for v in VARIANTS] + [1e3 * t["hooks"]["cpu_median_s"]]
                        + [t["nnsight/hooks"]["median"], t["tlens/hooks"]["median"], t["raw-hook/hooks"]["median"],
                           t["hooks-cayley/hooks"]["median"], t["hooks/bare"]["median"],
                           f"{t['loadavg_before']:.1f}-{t['loadavg_after'][0]:.1f}"])
    print_table("Stepwise LLM MAS step, ms (medians; ratios = medians of interleaved per-round ratios)",
                ["model", "threads"] + [f"{v} ms" for v in VARIANTS] + ["hooks CPU ms"]
                + ["nnsight/hooks", "TL/hooks", "raw/hooks", "cayley/hooks", "hooks/bare", "load1"], rows)
    write_result("llm_step", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
