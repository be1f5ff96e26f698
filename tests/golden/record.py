"""Golden results of small seeded MAS runs of every preset kind (the refactor-safety net).

    python tests/golden/record.py            # rewrite golden.json + golden_maps.safetensors (only before an
                                             # intended change)

Each case is a preset plus overrides, run to a few steps on the CPU with one thread. What is kept per case is
what the result means, not its bits: every evaluation record (trial/token IIA, loss, CIs, per-quantity IIA),
the training history (losses and validation scores; wall-clock seconds dropped) and what each trained alignment
*does*: for every ordered pair of models (source s, target t) and every variable block b, the transfer
operator T = W_s[:, b] @ W_t⁻¹[b, :] by which the intervention moves the source's latent into the target
(W the materialised alignment; for s = t it is the block's projector). The null block's operators are kept
for s = t only: its loss asks that swapping it change nothing, which any rotation of one model's null block
against another's satisfies, so the cross-model null operator is not determined by training (it moved by 9 %
of its displacement between CPUs where every determined operator moved by at most 0.5 %). The factors go to
``golden_maps.safetensors``; ``golden.json`` keeps, per operator, its displacement from the untrained
alignment (how far training moved it). Maps that are not alignments (linear stitch's own maps) are kept as
their parameters, with the same displacement.

Why not the bits: float kernels differ between CPUs (``ATEN_CPU_CAPABILITY=default`` / ``avx2`` / AVX-512 on
one machine already give three sets of last bits), and a few hundred Adam steps amplify that noise in
parameters with near-zero gradients (directions outside every trained block, rotations inside a DAS block),
so raw trained parameters move by up to 1.4e-2 relative between CPUs while what the alignments do moves by
at most 2.1e-3. ``tests/test_golden.py`` states the tolerances and their measurements.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from llm_mas.alignments import AlignmentMap
from llm_mas.interventions import NULL_VARIABLE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOLDEN = HERE / "golden.json"
GOLDEN_MAPS = HERE / "golden_maps.safetensors"

SMALL = ["data.n_train=256", "data.n_valid=96", "train.batch_size=64", "train.max_steps=6", "train.eval_every=3",
         "train.patience=100", "train.lr=5e-3", "progress=false", "eval.batch_size=50"]

# name -> (preset, overrides); every kind of run the runner supports
CASES: dict[str, tuple[str, list[str]]] = {
    "indywise": ("gru_gru_hidden", ["k=16"]),
    "stepwise": ("gru_gru_embeddings_stepwise", ["k=8"]),
    "das": ("das_gru", []),
    "stitch": ("gru_gru_hidden", ["k=16", "intervention=stitch"]),
    "linear_stitch": ("gru_gru_hidden", ["k=8", "intervention=linear_stitch", "directions=[[0,1],[1,0]]"]),
    "clmas": ("gru_gru_hidden", ["k=16", "cl.inaccessible=[1]", "cl.epsilon=0.5"]),
    "three_models": ("three_grus", ["k=8"]),
    "transformer_variables": ("gru_transformer_hidden",
                              ["k=8", "variables=[count,phase]", "models.0.standardize=true",
                               "models.1.alignment=low_rank"]),
    "null_subspace_cayley": ("gru_gru_hidden", ["k=8", "variables=[count,phase]", "null_subspace=true",
                                                "models.0.alignment_options={orthogonal_map: cayley}"]),
}
LLM_CASE = "llm_tiny"


def _history(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _factors(module: torch.nn.Module, blocks: dict[str, slice]) -> dict[str, torch.Tensor]:
    """What one trained map does, as tensors: an alignment's encode columns and decode rows of its blocks'
    span (float64), or the parameters of a map that is not an alignment."""
    alignment_map = module.materialize()
    if not isinstance(alignment_map, AlignmentMap):
        return {f"param.{k}": v.detach().double() for k, v in sorted(module.state_dict().items())}
    used = slice(0, max(b.stop for b in blocks.values()))
    d, dim_out = alignment_map.d, alignment_map.dim_out
    eye_in = torch.eye(d, dtype=torch.float64)
    with torch.no_grad():
        weight = alignment_map.weight.double() if alignment_map.weight is not None else eye_in[:, :dim_out]
        inverse = (alignment_map.inverse_weight.double() if alignment_map.inverse_weight is not None
                   else eye_in[:dim_out])
    return {"encode": weight[:, used].contiguous(), "decode": inverse[used].contiguous()}  # (d, u), (u, d)


def operators(factors: dict[str, dict[str, torch.Tensor]], blocks: dict[str, slice]) -> dict[str, torch.Tensor]:
    """name -> tensor of what the maps do: ``s->t:block`` transfer operators (d_s, d_t) for alignments,
    ``m<i>.param.<name>`` for other maps. ``factors``: model index (str) -> `_factors` output."""
    out: dict[str, torch.Tensor] = {}
    aligned = [i for i, f in factors.items() if "encode" in f]
    for i, f in factors.items():
        out.update({f"m{i}.{k}": v for k, v in f.items() if k.startswith("param.")})
    for s in aligned:
        for t in aligned:
            for name, b in blocks.items():
                if name == NULL_VARIABLE and s != t:
                    continue  # see the module docstring
                out[f"{s}->{t}:{name}"] = factors[s]["encode"][:, b] @ factors[t]["decode"][b]  # (d_s, d_t)
    return out


def trained_and_initial(config, run_dir: Path):
    """The run's trained maps (loaded from its alignments.safetensors) and the same maps untrained (as
    ``build_alignments`` makes them from the config's seeds), with the variable blocks."""
    from safetensors.torch import load_file

    from llm_mas.run import build_alignments, build_problem

    problem = build_problem(config)
    initial = build_alignments(config, problem)
    trained = build_alignments(config, problem)
    state = load_file(str(run_dir / "alignments.safetensors"))
    for i, module in enumerate(trained):
        prefix = f"model{i}."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return trained, initial, dict(problem.blocks)


def summarise(config, run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON summary, tensors for golden_maps.safetensors) of a finished run."""
    trained, initial, blocks = trained_and_initial(config, run_dir)
    factors = {str(i): _factors(m, blocks) for i, m in enumerate(trained)}
    now = operators(factors, blocks)
    before = operators({str(i): _factors(m, blocks) for i, m in enumerate(initial)}, blocks)
    maps = {k: {"shape": list(v.shape), "norm": float(v.norm()), "displacement": float((v - before[k]).norm())}
            for k, v in sorted(now.items())}
    tensors = {f"{i}.{k}": v.float() for i, f in factors.items() for k, v in f.items()}
    return {"records": json.loads((run_dir / "results.json").read_text()),
            "history": _history(run_dir / "history.csv"), "maps": maps,
            "blocks": {name: [b.start, b.stop] for name, b in blocks.items()}}, tensors


def factors_from_tensors(tensors: dict[str, torch.Tensor], case: str) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of the tensor naming in `summarise` for one case of golden_maps.safetensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, index, rest = key.split(".", 2)
        if name == case:
            out.setdefault(index, {})[rest] = v.double()
    return out


def _llm_inputs(root: Path) -> list[str]:
    """Two tiny Qwen2s (seeds 0, 1) with small recordings, built offline; overrides pointing at them."""
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import build_tiny_qwen2, tiny_corpus

    over = []
    for i, seed in enumerate((0, 0, 1)):
        model_dir = root / f"tiny-{seed}"
        rec_dir = root / f"rec-{seed}"
        if not (model_dir / "config.json").exists():
            build_tiny_qwen2(model_dir, seed=seed)
            model, tok = load_causal_lm(model_dir)
            record_generations(model, tok, tiny_corpus(80, seed=5), prompt_len=12, total_len=32, n=60,
                               batch_size=30, progress=False).save(rec_dir)
        over += [f"models.{i}.name={model_dir}", f"models.{i}.recording={rec_dir}"]
    return over


def run_case(name: str, work: Path, extra_overrides: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run one case in ``work`` (``extra_overrides`` after the case's own, e.g. to show that a changed run
    is caught); returns `summarise`'s (summary, factor tensors)."""
    from llm_mas.presets import resolve_preset
    from llm_mas.run import run as run_mas
    from llm_mas.run_config import load_mas_config

    torch.set_num_threads(1)
    if name == LLM_CASE:
        preset, extra = "llm_tiny", _llm_inputs(work / "llm_inputs") + ["k=16", "data.n_train=64",
                                                                          "data.n_valid=32", "train.batch_size=16",
                                                                          "train.max_steps=4", "train.eval_every=2",
                                                                          "eval.batch_size=32"]
    else:
        preset, extra = CASES[name]
    path = resolve_preset(preset)
    overrides = SMALL + extra + [f"name={name}", f"out_dir={work}"] + (
        ["train.lr=2e-2", "progress=false"] if name == LLM_CASE else []) + list(extra_overrides)
    cfg = load_mas_config(path, overrides)
    run_mas(cfg, log=lambda s: None)
    return summarise(cfg, work / name)


def all_cases() -> list[str]:
    return [*CASES, LLM_CASE]


def main() -> None:
    import tempfile

    from safetensors.torch import save_file

    out, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in all_cases():
            out[name], factors = run_case(name, Path(tmp))
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in factors.items()})
            print(f"{name}: {len(out[name]['records'])} records, {len(out[name]['maps'])} maps", flush=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True))
    save_file(tensors, str(GOLDEN_MAPS))
    print(f"wrote {GOLDEN} and {GOLDEN_MAPS}")


if __name__ == "__main__":
    sys.exit(main())
