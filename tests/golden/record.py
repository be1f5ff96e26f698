"""Golden results of small seeded MAS runs of every preset kind (the refactor-safety net).

    python tests/golden/record.py            # rewrite tests/golden/golden.json (only before an intended change)

Each case is a preset plus overrides, run to a few steps on the CPU with one thread. What is kept per case:
every evaluation record (trial/token IIA, loss, CIs, per-quantity IIA), the training history (losses and
validation scores; wall-clock seconds dropped) and per alignment tensor its sha256, shape, sum, sum of
squares and 16 evenly spaced values. `platform` is the sha256 of a fixed computation (matmul, GRU, matrix
exponential) on the machine that recorded them. `tests/test_golden.py` reruns the cases: on a machine whose
probe gives the same bits it asserts them bit-identical; on another CPU (other SIMD kernels, so other last
bits) it compares every number within a tolerance.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOLDEN = HERE / "golden.json"

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


def _tensor_summary(v: torch.Tensor) -> dict:
    flat = v.detach().double().flatten()
    picks = torch.linspace(0, max(flat.numel() - 1, 0), min(16, flat.numel())).round().long()
    return {"sha256": hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest(), "shape": list(v.shape),
            "sum": float(flat.sum()), "sum_sq": float((flat * flat).sum()), "sample": flat[picks].tolist()}


def _tensor_summaries(path: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    return {k: _tensor_summary(v) for k, v in sorted(load_file(str(path)).items())}


def platform_probe() -> str:
    """sha256 of a fixed float computation: equal on machines whose kernels give the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded runs use one thread; restored below
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 17, 32, generator=g)
    a = torch.randn(32, 32, generator=g)
    gru = torch.nn.GRU(32, 48, batch_first=True)
    with torch.no_grad():
        for p in gru.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out = [x @ a, gru(x)[0], torch.linalg.matrix_exp((a - a.T) * 0.1)]
    torch.set_num_threads(threads)
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in out)).hexdigest()


def _history(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def summarise(run_dir: Path) -> dict:
    return {"records": json.loads((run_dir / "results.json").read_text()),
            "history": _history(run_dir / "history.csv"),
            "alignments": _tensor_summaries(run_dir / "alignments.safetensors")}


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


def run_case(name: str, work: Path) -> dict:
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
        ["train.lr=2e-2", "progress=false"] if name == LLM_CASE else [])
    cfg = load_mas_config(path, overrides)
    run_mas(cfg, log=lambda s: None)
    return summarise(work / name)


def all_cases() -> list[str]:
    return [*CASES, LLM_CASE]


def main() -> None:
    import tempfile

    out = {"platform": platform_probe()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in all_cases():
            out[name] = run_case(name, Path(tmp))
            print(f"{name}: {len(out[name]['records'])} records", flush=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True))
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    sys.exit(main())
