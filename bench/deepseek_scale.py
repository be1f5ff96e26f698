"""The paper's scale without the hub: one stepwise MAS step between two DeepSeek-R1-Distill-Qwen-1.5B-shaped LMs.

    python bench/deepseek_scale.py                          # CPU, 2 layers, batch 2 (seconds per step)
    python bench/deepseek_scale.py --layers 28 --batch 1    # CPU, full depth: ~2 x 7.1 GB fp32, minutes
    python bench/deepseek_scale.py --device cuda --dtype bfloat16    # full size, batch 32 x 64 tokens

The architecture is DeepSeek-R1-Distill-Qwen-1.5B's, built from a ``Qwen2Config`` with random weights (no
download): hidden 1536, 28 layers, 12 heads / 2 KV heads, intermediate 8960, vocab 151936, RMSNorm eps 1e-6,
rope theta 10000, untied input and output embeddings (``tie_word_embeddings=False``: that model has 1.78 B
parameters, which is 1.31 B in the blocks plus two separate 151936 x 1536 tables). ``--layers`` keeps the
first L blocks (the embeddings and the head stay full size).

The step is recipes/configs/llm_deepseek.yaml's (stepwise MAS at the embedding layer, k = d/2 = 768, Cayley
rotations, both directions), one micro-batch: per direction the target model runs with its embeddings at
positions 0..i (i ~ U[10, T-10) per row) replaced by ``intervene(A_t, A_s, h_t, h_s, [0, k))``, its inputs
after i are the source's tokens, cross-entropy at positions >= i against fixed labels (random tokens: the
recorded greedy predictions only change the numbers, not the cost), backward; then one Adam step on both
rotations. It is built from backends + alignments + interchange directly (`mas_step` below, the one place
to repoint). Variants, interleaved: ``hooks`` (TorchHookBackend) and ``nnsight`` (NNsightBackend).
Memory: peak RSS during each variant's steps above the RSS before them (CPU, sampled every 5 ms), or
``torch.cuda.max_memory_allocated`` (GPU). Also timed: one orthogonal rotation at d = 1536, materialize +
backward, Cayley vs matrix exponential. Adds its run (tag <device>-<dtype>-<L>L) to bench/results/deepseek_scale.json.

Batch: the recipe's micro-batch is 32 sequences of 64 tokens (the default on CUDA); on CPU the default is 2
(the 151936-way head alone is ~1 TFLOP per direction at batch 32).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import alignment_cost, interleaved, machine_info, median, print_table, ratio, write_result  # noqa: E402

from llm_mas.alignments import make_alignment  # noqa: E402
from llm_mas.backends import Edit, get_backend  # noqa: E402
from llm_mas.interventions import intervene  # noqa: E402
from llm_mas.resources import peak_resident_mib, resident_mib  # noqa: E402
from llm_mas.sites import Site  # noqa: E402

IGNORE = -100
DEEPSEEK_R1_DISTILL_QWEN_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, use_sliding_window=False, hidden_act="silu", bos_token_id=151646,
    eos_token_id=151643)
VARIANTS = ("hooks", "nnsight")


def mas_step(backend, models, alignments, optimizer, batch) -> float:
    """One stepwise MAS step over both directions (the adapter to repoint at the library's own step).

    models: [m0, m1]; alignments: [A0, A1]; batch: per direction (target t, source s) the target's input ids
    (B, T), the edit mask (B, T), the source's embedding latents at the mask's entries (n, d) and labels (B, T).
    """
    optimizer.zero_grad(set_to_none=True)
    maps = [a.materialize() for a in alignments]
    site = Site.parse("embeddings")
    total = 0.0
    for n, ((t, s), (ids, mask, source_entries, labels)) in enumerate(batch.items()):
        target_map, source_map = maps[t], maps[s]

        def edit_fn(h, which, target_map=target_map, source_map=source_map, source_entries=source_entries):
            # the rotations are float32; a bfloat16 model's latents are rotated in float32 and cast back
            new = intervene(target_map, source_map, h.float(), source_entries[which].float(), slice(0, target_map.d // 2))
            return new.to(h.dtype)

        logits = backend.patch(models[t], {"input_ids": ids}, [Edit(site=site, mask=mask, fn=edit_fn)])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        loss.backward(retain_graph=n + 1 < len(batch))  # the rotations' graph is shared by the directions
        total += float(loss.detach())
        del logits, loss
    optimizer.step()
    return total


def build_model(layers: int, seed: int, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llm_mas.llm.loading import freeze
    from llm_mas.sites import register_site_aliases

    config = Qwen2Config(**{**DEEPSEEK_R1_DISTILL_QWEN_1_5B, "num_hidden_layers": layers})
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(dtype)
    return register_site_aliases(freeze(model))


def make_batch(models, batch: int, length: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = models[0].config.vocab_size
    token_ids = [torch.randint(0, vocab, (batch, length), generator=g) for _ in models]  # one stream per model
    out = {}
    hooks = get_backend("torch")
    for t, s in ((1, 0), (0, 1)):
        index = torch.randint(10, length - 10, (batch,), generator=g)  # (B,) i per row
        col = torch.arange(length)
        mask = col[None, :] <= index[:, None]  # (B, T): positions 0..i
        ids = torch.where(mask, token_ids[t], token_ids[s])  # after i: the source's tokens
        with torch.no_grad():
            latents = hooks.collect(models[s], {"input_ids": token_ids[s].to(device)}, ["embeddings"])
        source_latents = next(iter(latents.values()))  # (B, T, d)
        labels = torch.where(col[None, :] >= index[:, None], torch.randint(0, vocab, (batch, length), generator=g),
                             torch.full((batch, length), IGNORE))
        out[(t, s)] = (ids.to(device), mask.to(device), source_latents[mask.to(device)], labels.to(device))
    return out


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    return int(resident_mib() * 2**20)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=None, help="sequences per direction (cuda: 32, cpu: 2)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-alignment-cost", action="store_true")
    parser.add_argument("--tag", default=None, help="result file suffix (default: <device>-<layers>L)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    batch = args.batch or (32 if cuda else 2)
    dtype = getattr(torch, args.dtype)
    result = {"machine_start": machine_info(), "config": {**DEEPSEEK_R1_DISTILL_QWEN_1_5B, "num_hidden_layers":
              args.layers}, "device": args.device, "dtype": args.dtype, "batch": batch, "length": args.length,
              "k": 768, "orthogonal_map": "cayley", "threads": args.threads}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)

    t0 = time.perf_counter()
    rss_before_models = _rss()
    models = [build_model(args.layers, seed, dtype, args.device) for seed in (0, 1)]
    result["build_seconds"] = time.perf_counter() - t0
    result["parameters_per_model"] = sum(p.numel() for p in models[0].parameters())
    result["rss_models_bytes"] = _rss() - rss_before_models
    data = make_batch(models, batch, args.length, args.device)
    d = models[0].config.hidden_size
    backends = {v: get_backend("torch" if v == "hooks" else "nnsight") for v in VARIANTS}
    alignments = {v: [make_alignment("orthogonal", d, k=d // 2, seed=i, orthogonal_map="cayley").to(args.device)
                      for i in range(2)] for v in VARIANTS}
    optimizers = {v: torch.optim.Adam([p for a in alignments[v] for p in a.parameters()], lr=1e-3) for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    memory: dict[str, int] = {}

    def run(v):
        def call():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                losses[v].append(mas_step(backends[v], models, alignments[v], optimizers[v], data))
                torch.cuda.synchronize()
                memory[v] = max(memory.get(v, 0), torch.cuda.max_memory_allocated())
            else:
                with PeakRSS() as peak:
                    losses[v].append(mas_step(backends[v], models, alignments[v], optimizers[v], data))
                memory[v] = max(memory.get(v, 0), peak.peak - peak.start)
        return call

    cpu: dict[str, list[float]] = {}
    times = interleaved({v: run(v) for v in VARIANTS}, repeats=args.repeats, warmup=1, cpu=cpu)
    for v in VARIANTS:
        result[v] = {"median_s": median(times[v]), "cpu_median_s": median(cpu[v]), "times_s": times[v],
                     ("peak_cuda_allocated_bytes" if cuda else "peak_rss_above_start_bytes"): memory[v],
                     "first_loss": losses[v][0]}
    result["nnsight/hooks"] = ratio(times, "nnsight", "hooks")
    result["first_loss_diff"] = abs(losses["nnsight"][0] - losses["hooks"][0])
    if cuda:
        result["peak_cuda_allocated_total_bytes"] = torch.cuda.max_memory_allocated()
    result["peak_rss_process_bytes"] = _rss_peak_process()
    models.clear()  # free the two models before timing the rotations
    data.clear()
    if not args.no_alignment_cost:
        if cuda:
            result["rotation_d1536_ms"] = _alignment_cost_cuda(d, args.device)
        else:
            result["rotation_d1536_ms"] = alignment_cost(d, d // 2, repeats=3)
    print_table(f"Stepwise MAS step, DeepSeek-R1-Distill-Qwen-1.5B shape, {args.layers} layers, {args.device} "
                f"{args.dtype}, batch {batch} x {args.length}",
                ["variant", "median s", "CPU s", "peak memory GB", "first loss"],
                [[v, result[v]["median_s"], result[v]["cpu_median_s"], memory[v] / 2**30, result[v]["first_loss"]]
                 for v in VARIANTS])
    print(f"nnsight/hooks x{result['nnsight/hooks']['median']:.3f}; rotation d=1536 materialize+backward ms: "
          + ", ".join(f"{m} {ms:.0f}" for m, ms in result.get("rotation_d1536_ms", {}).items()))
    tag = args.tag or f"{'cuda' if cuda else 'cpu'}-{args.dtype}-{args.layers}L"
    write_result("deepseek_scale", {"runs": {**_previous_runs(), tag: result}})
    return result


def _previous_runs() -> dict:
    """The runs already in bench/results/deepseek_scale.json (one entry per device/dtype/depth tag)."""
    import json

    from common import RESULTS

    path = RESULTS / "deepseek_scale.json"
    return json.loads(path.read_text()).get("runs", {}) if path.exists() else {}


def _rss_peak_process() -> int:
    return int(peak_resident_mib() * 2**20)


def _alignment_cost_cuda(d: int, device: str, repeats: int = 5) -> dict:
    out = {}
    for orthogonal_map in ("matrix_exp", "cayley"):
        alignment = make_alignment("orthogonal", d, k=d // 2, seed=0, orthogonal_map=orthogonal_map).to(device)
        probe = torch.randn(d, d, device=device)
        times = []
        for r in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            (alignment.materialize().weight * probe).sum().backward()
            alignment.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
        out[orthogonal_map] = 1e3 * median(times)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
