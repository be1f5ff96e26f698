"""Correlative vs causal similarity: RSA and CKA against MAS trial IIA on the same pairs of models.

    python recipes/correlative_vs_causal.py recipes/configs/correlative_vs_causal.yaml
    python recipes/correlative_vs_causal.py recipes/configs/correlative_vs_causal.yaml --smoke   # seconds
    python recipes/correlative_vs_causal.py recipes/configs/correlative_vs_causal.yaml --only gru_gru_hidden

For every comparison (two models at one site: GRU–GRU seeds, GRU–LSTM, GRU–Transformer, each at the input
embeddings and at the hidden state) the recipe
1. computes RSA (cosine / euclidean RDMs × Spearman / Pearson) and linear CKA (biased / unbiased) on the
   rows of the same 300 MultiObject sequences (``llm_mas.correlative.run_similarity``);
2. trains MAS between the same two models at the same site from the comparison's MAS preset (stepwise at
   the embeddings, indywise at the hidden state; ``llm_mas.mas.run_mas``), and takes trial IIA in each
   cross direction and their mean;
3. writes ``runs/<name>/comparison.csv``, ``comparison.png`` (a heat-table: rows = comparisons,
   columns = measures) and ``summary.md``.

Restartable: a finished MAS run (``results.json`` present, same resolved config) is reused, in the
recipe's own ``mas/`` folder or in ``reuse_dirs`` (e.g. ``runs/gru_gru_hidden`` from
``llm-mas mas recipes/configs/gru_gru_hidden.yaml``); an unfinished one resumes from its checkpoint.
The table and figure are rewritten after every MAS run, so a partial run already has them (pending rows
show NaN). ``--only a,b`` trains only those comparisons and still tabulates every finished one.

``--smoke`` shrinks everything (2 MAS steps, a few dozen pairs, 2 subsamples of 64 rows) into
``runs/<name>-smoke``; ``--models-from-scratch`` (tests) replaces every model by a randomly initialised
checkpoint of the same architecture, written into the run directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Keys of a MAS config that do not change its results (a finished run with other values is reused).
MAS_IGNORED_KEYS = ("name", "out_dir", "progress", "resume", "device")
SIMILARITY_IGNORED_KEYS = ("name", "out_dir", "device", "batch_size")
SMOKE_MAS = ["data.n_train=48", "data.n_valid=24", "train.max_steps=2", "train.eval_every=2",
             "train.batch_size=24", "eval.batch_size=64"]
SMOKE_SIMILARITY = {"n_rows": 64, "n_repeats": 2, "per_quantity": 2}
MEASURE_LABELS = {
    "rsa_cosine_spearman": "RSA cos\nSpearman", "rsa_cosine_pearson": "RSA cos\nPearson",
    "rsa_euclidean_spearman": "RSA L2\nSpearman", "rsa_euclidean_pearson": "RSA L2\nPearson",
    "cka_biased": "CKA\nbiased", "cka_unbiased": "CKA\nunbiased",
    "mas_trial_iia_cross_mean": "MAS IIA\nmean", "mas_trial_iia_a_to_b": "MAS IIA\nA→B",
    "mas_trial_iia_b_to_a": "MAS IIA\nB→A",
}


@dataclass
class Comparison:
    name: str                         # row label and run-directory name
    models: list[str]                 # [A, B]: shipped task-model names or checkpoint directories
    site: str                         # embeddings | hidden (same site in both models)
    mas_preset: str                   # MAS preset YAML; its models' names/sites and its name are replaced
    mas_overrides: list[str] = field(default_factory=list)   # extra key=value for the MAS config

    def validate(self) -> list[str]:
        p = []
        if len(self.models) != 2:
            p.append(f"comparison {self.name!r}: models must list two models, got {self.models}")
        if not _preset_path(self.mas_preset).exists():
            p.append(f"comparison {self.name!r}: mas_preset {self.mas_preset!r} does not exist "
                     f"(relative paths are tried from the working directory and from {REPO})")
        return p


@dataclass
class SimilaritySettings:
    n_rows: int = 1000
    n_repeats: int = 10
    per_quantity: int = 15            # sequences per quantity N = 1..20


@dataclass
class RecipeConfig:
    comparisons: list[Comparison]
    name: str = "correlative_vs_causal"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    similarity: SimilaritySettings = field(default_factory=SimilaritySettings)
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])  # where finished MAS runs may be

    def validate(self) -> list[str]:
        p = [] if self.comparisons else ["comparisons: list at least one comparison"]
        names = [c.name for c in self.comparisons]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            p.append(f"comparison names must be unique; repeated: {', '.join(dupes)}")
        return p


def _preset_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


# ================================================================================== run helpers
def _comparable(data: dict, ignored: tuple[str, ...]) -> dict:
    return {k: v for k, v in data.items() if k not in ignored}


def _same_config(run_dir: Path, cls, config, ignored: tuple[str, ...]) -> bool:
    """True when run_dir/config.yaml resolves to `config` (up to `ignored` keys)."""
    from llm_mas.config import from_dict, load_yaml, to_dict
    from llm_mas.errors import ConfigError

    path = run_dir / "config.yaml"
    if not path.exists():
        return False
    try:
        saved = from_dict(cls, load_yaml(path))
    except ConfigError:
        return False
    return _comparable(to_dict(saved), ignored) == _comparable(to_dict(config), ignored)


def mas_config_for(comparison: Comparison, run_dir: Path, smoke: bool, device: str):
    """The comparison's MAS config: its preset with the comparison's models and site, named after it."""
    from llm_mas.config import from_dict, to_dict
    from llm_mas.errors import ConfigError
    from llm_mas.mas import MASConfig, load_mas_config

    cfg = load_mas_config(_preset_path(comparison.mas_preset),
                          [*comparison.mas_overrides, *(SMOKE_MAS if smoke else [])])
    data = to_dict(cfg)
    if len(data["models"]) != 2:
        raise ConfigError(f"MAS preset {comparison.mas_preset} has {len(data['models'])} models; "
                          f"comparisons need two-model presets")
    for entry, name in zip(data["models"], comparison.models):
        entry.update(name=name, site=comparison.site)
    data.update(name=comparison.name, out_dir=str(run_dir / "mas"), device=device, progress=not smoke)
    return from_dict(MASConfig, data)


def finished_mas_run(cfg, preset_name: str, reuse_dirs: list[str]) -> Path | None:
    """A finished run of exactly this config: in the recipe's mas/ folder or <reuse_dir>/<preset name>."""
    from llm_mas.mas import MASConfig

    candidates = [Path(cfg.out_dir) / cfg.name] + [Path(d) / preset_name for d in reuse_dirs]
    for run in candidates:
        if (run / "results.json").exists() and _same_config(run, MASConfig, cfg, MAS_IGNORED_KEYS):
            return run
    return None


def similarity_for(comparison: Comparison, config: RecipeConfig, run_dir: Path, smoke: bool, log) -> dict:
    """RSA/CKA of the comparison (reused from run_dir/similarity/<name> when its config matches)."""
    from llm_mas.correlative import SimilarityConfig, run_similarity, similarity_config

    settings = SMOKE_SIMILARITY if smoke else vars(config.similarity)
    cfg = similarity_config(
        name=comparison.name, out_dir=str(run_dir / "similarity"), seed=config.seed, device=config.device,
        models=[{"name": m, "site": comparison.site} for m in comparison.models],
        n_rows=settings["n_rows"], n_repeats=settings["n_repeats"],
        sequences={"per_quantity": settings["per_quantity"]})
    done = Path(cfg.out_dir) / cfg.name
    if (done / "similarity.json").exists() and _same_config(done, SimilarityConfig, cfg, SIMILARITY_IGNORED_KEYS):
        log(f"  similarity: reusing {done}")
        return json.loads((done / "similarity.json").read_text())
    return run_similarity(cfg, log=lambda msg: log("  " + msg))


def mas_for(comparison: Comparison, config: RecipeConfig, run_dir: Path, smoke: bool, train: bool, log):
    """(MAS summary dict, run directory) — reusing, resuming or training; (None, None) when pending."""
    from llm_mas.config import load_yaml
    from llm_mas.correlative import mas_direction_summary
    from llm_mas.mas import MASConfig, run_mas
    from llm_mas.results import MASResult

    cfg = mas_config_for(comparison, run_dir, smoke, config.device)
    preset_name = load_yaml(_preset_path(comparison.mas_preset)).get("name", "")
    found = finished_mas_run(cfg, preset_name, config.reuse_dirs)
    if found is not None:
        log(f"  MAS: reusing finished run {found}")
        result = MASResult.load(found)
    elif not train:
        return None, None
    else:
        own = Path(cfg.out_dir) / cfg.name
        if (own / "checkpoint.pt").exists() and not _same_config(own, MASConfig, cfg, MAS_IGNORED_KEYS):
            log(f"  MAS: {own} holds a run of another config; starting afresh (resume=false)")
            cfg.resume = False
        elif (own / "checkpoint.pt").exists():
            log(f"  MAS: resuming {own} from its checkpoint")
        log(f"  MAS: {'stepwise' if cfg.data.stepwise else 'indywise'}, k={cfg.k}, {cfg.data.n_train} pairs, "
            f"preset {comparison.mas_preset}")
        result = run_mas(cfg, log=lambda msg: log("  " + msg))
        found = result.run_dir
    summary = {f"mas_trial_iia_{k}": v for k, v in mas_direction_summary(result.records).items()}
    summary.update({f"mas_token_iia_{k}": v for k, v in
                    mas_direction_summary(result.records, metric="token_iia").items()})
    info_path = Path(found) / "summary.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    summary.update(mas_best_step=info.get("best_step"), mas_steps=info.get("steps"),
                   mas_stopped=info.get("stopped"), mas_seconds=info.get("seconds"))
    return summary, Path(found)


# ================================================================================== outputs
def table_rows(config: RecipeConfig, similarities: dict, mas: dict) -> list[dict]:
    from llm_mas.correlative import flatten_metrics

    rows = []
    for comp in config.comparisons:
        row = {"comparison": comp.name, "site": comp.site, "model_a": comp.models[0], "model_b": comp.models[1]}
        sim = similarities.get(comp.name)
        if sim is not None:
            row.update(flatten_metrics(sim["pairs"][0]["metrics"]))
            row["n_rows_total"] = sim["n_rows_total"]
        summary, run = mas.get(comp.name, (None, None))
        row.update(summary or {"mas_trial_iia_cross_mean": math.nan})
        row["mas_run_dir"] = str(run) if run else "pending"
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_heat_table(rows: list[dict], path: Path, title: str) -> None:
    """Rows = comparisons, columns = correlative measures | MAS trial IIA; colour 0..1, values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = list(MEASURE_LABELS)
    values = np.array([[float(r.get(c, math.nan)) if r.get(c) is not None else math.nan for c in columns]
                       for r in rows])  # (n_comparisons, n_columns)
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 2.6, 0.55 * len(rows) + 1.6))
    ax.imshow(np.clip(values, 0, 1), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [MEASURE_LABELS[c] for c in columns], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['comparison'].replace('_', ' ')}" for r in rows], fontsize=9)
    ax.xaxis.tick_top()
    for (i, j), v in np.ndenumerate(values):
        text = "–" if np.isnan(v) else f"{v:.2f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="k" if not np.isnan(v) and v > 0.6 else "w")
    ax.axvline(5.5, color="w", linewidth=3)  # correlative | causal
    ax.set_title(title, fontsize=10, pad=34)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_summary(rows: list[dict], path: Path, command: str, seconds: float) -> None:
    columns = ["comparison", "rsa_cosine_spearman", "rsa_euclidean_spearman", "rsa_cosine_pearson",
               "rsa_euclidean_pearson", "cka_biased", "cka_unbiased", "mas_trial_iia_cross_mean",
               "mas_trial_iia_a_to_b", "mas_trial_iia_b_to_a"]
    lines = ["# Correlative vs causal similarity\n", f"`{command}` ({seconds:.0f} s this call)\n",
             "RSA/CKA: mean over row subsamples (same rows in both models); MAS: validation trial IIA of the "
             "best checkpoint, A = first model, B = second.\n",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    lines.append("")
    for r in rows:
        corr = [r.get(c) for c in columns[1:7] if r.get(c) is not None]
        iia = r.get("mas_trial_iia_cross_mean")
        if not corr or iia is None or math.isnan(iia):
            lines.append(f"- {r['comparison']}: MAS pending.")
            continue
        lines.append(f"- {r['comparison']}: RSA {min(corr[:4]):.2f}–{max(corr[:4]):.2f}, CKA "
                     f"{min(corr[4:]):.2f}–{max(corr[4:]):.2f}; MAS trial IIA {iia:.2f} "
                     f"(A→B {r['mas_trial_iia_a_to_b']:.2f}, B→A {r['mas_trial_iia_b_to_a']:.2f}).")
    path.write_text("\n".join(lines) + "\n")


# ================================================================================== scratch models
def scratch_checkpoints(config: RecipeConfig, directory: Path) -> dict[str, str]:
    """Randomly initialised checkpoints standing in for every named model (tests without shipped ones).

    A name like ``multiobject-gru-s1`` gives a GRU for MultiObject whose weights come from a seed derived
    from the whole name (so models of different architectures never share an initialisation).
    """
    import zlib

    import yaml

    from llm_mas.errors import ConfigError
    from llm_mas.models import build_task_model
    from llm_mas.tasks import get_task

    mapping = {}
    for name in dict.fromkeys(m for c in config.comparisons for m in c.models):
        parts = Path(name).name.split("-")
        if len(parts) < 2:
            raise ConfigError(f"--models-from-scratch needs names like multiobject-gru-s0, got {name!r}")
        task, arch = parts[0], parts[1]
        out = directory / Path(name).name
        if not (out / "model.safetensors").exists():
            from safetensors.torch import save_file

            model = build_task_model(arch, task, len(get_task(task).vocab), seed=zlib.crc32(name.encode()) % 10_000)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text("# random initialisation (correlative_vs_causal --models-from-scratch)\n"
                                             + yaml.safe_dump({"model": dict(model.config)}, sort_keys=False))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        mapping[name] = str(out)
    return mapping


# ================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "recipes/configs/correlative_vs_causal.yaml"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe config")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (seconds), run dir <name>-smoke")
    parser.add_argument("--only", default="", help="comma list of comparisons to compute (others: tabulated "
                                                   "when already finished)")
    parser.add_argument("--models-from-scratch", action="store_true",
                        help="(tests) random-weight checkpoints instead of the named models")
    args = parser.parse_intermixed_args(argv)

    import torch

    from llm_mas.config import load_config, save_config
    from llm_mas.errors import ConfigError, MASError

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    command = "python recipes/correlative_vs_causal.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(RecipeConfig, args.config, args.overrides)
        only = [s for s in args.only.split(",") if s]
        unknown = [s for s in only if s not in {c.name for c in config.comparisons}]
        if unknown:
            raise ConfigError(f"--only: unknown comparisons {unknown}; valid: "
                              f"{', '.join(c.name for c in config.comparisons)}")
        run_dir = Path(config.out_dir) / (config.name + ("-smoke" if args.smoke else ""))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml", header=command)
        if args.models_from_scratch:
            mapping = scratch_checkpoints(config, run_dir / "scratch_models")
            for comp in config.comparisons:
                comp.models = [mapping[m] for m in comp.models]
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        similarities, mas = {}, {}
        for i, comp in enumerate(config.comparisons, 1):
            log(f"[{i}/{len(config.comparisons)}] {comp.name}: {' vs '.join(Path(m).name for m in comp.models)} "
                f"at {comp.site}"
                f" — similarity ({time.perf_counter() - t0:.0f}s)")
            similarities[comp.name] = similarity_for(comp, config, run_dir, args.smoke, log)
        for i, comp in enumerate(config.comparisons, 1):
            train = not only or comp.name in only
            log(f"[{i}/{len(config.comparisons)}] {comp.name}: MAS ({time.perf_counter() - t0:.0f}s)")
            t_mas = time.perf_counter()
            mas[comp.name] = mas_for(comp, config, run_dir, args.smoke, train, log)
            if mas[comp.name][0] is None:
                log("  MAS: not finished and not selected by --only; left pending")
            else:
                log(f"  MAS: trial IIA cross mean {mas[comp.name][0]['mas_trial_iia_cross_mean']:.3f} "
                    f"({time.perf_counter() - t_mas:.0f}s)")
            rows = table_rows(config, similarities, mas)  # rewritten after every run: partial results on disk
            write_csv(rows, run_dir / "comparison.csv")
            plot_heat_table(rows, run_dir / "comparison.png", f"Correlative (RSA, CKA) vs causal (MAS) — {run_dir.name}")
            write_summary(rows, run_dir / "summary.md", command, time.perf_counter() - t0)
    except MASError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {run_dir}/comparison.csv, comparison.png, summary.md ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
