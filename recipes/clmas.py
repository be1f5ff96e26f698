"""CLMAS: MAS when model 1 is causally inaccessible (its latents can be recorded, its behaviour under
intervention may not be used), against MAS with full access, latent and behavioural stitching and controls.

    python -m recipes.clmas recipes/configs/clmas.yaml
    python -m recipes.clmas recipes/configs/clmas.yaml --smoke                     # seconds
    python -m recipes.clmas recipes/configs/clmas.yaml epsilons=[0.89] methods=[mas,clmas]

Two MultiObject GRU seeds at the hidden state; model 0 is accessible, model 1 inaccessible. Runs
(``llm_mas.run.run``; data and trainer settings from ``mas_preset``):
- ``mas``: MAS with full access (every direction trained by behaviour) — the reference point;
- ``clmas_eps{ε}``: CLMAS, ``cl.inaccessible=[1]``: directions into model 1 (0→1, 1→1) trained only by the
  counterfactual-latent loss, the others by behaviour; loss (1 − ε)·L_behaviour + ε·L_CL; CL targets are
  natural latents of model 1 matched on every variable of the intended causal state (obj_count, phase, count);
- ``clmas_eps{ε}_k{k}_match-{vars}`` (method ``clmas_partial_match``): the same with CL targets matched only on
  ``partial_match`` (default phase and count, what the rest of the sequence depends on): a full swap can
  intend a count above the target's own obj_count, a state no natural run has, so matching on everything
  leaves those pairs without a CL target (their count is in the table); with it runs
  ``latent_stitch_k{k}_match-{vars}``, latent stitching with the same CL targets (its fair baseline);
- ``latent_stitch``: rank-``stitch_k`` isometric stitch 0→1 trained by the CL loss alone (no behaviour);
- ``behavioural_stitch``: the same stitch trained on 0→1 by behaviour — this *uses model 1's behaviour*,
  i.e. it is not available when model 1 is truly inaccessible;
- ``reverse_behavioural_stitch``: the stitch trained on 1→0 by model 0's behaviour only; its 0→1 map is
  the transpose (h_0 Q_0 P_k Q_1ᵀ of the same partial isometry) — behavioural stitching that respects the
  inaccessibility;
- ``random_alignment``: MAS with 0 training steps (random orthogonal alignments): chance level;
- ``untrained_model``: MAS with full access where model 1 is a freshly initialised copy: chance level.
Every direction is evaluated behaviourally. The table reports trial IIA in the accessible direction
(1→0: the intervened model is model 0) and the inaccessible one (0→1). Outputs in ``runs/<name>/``:
``results.csv``, ``iia_by_method.png``, ``summary.md``; rewritten after every run.

Restartable (finished runs with the same resolved config are reused from ``runs/<name>/mas/`` or
``reuse_dirs``; unfinished ones resume). ``--smoke``: 2 steps, tiny data, ``runs/<name>-smoke``;
``--models-from-scratch``: random-weight checkpoints instead of the named models (tests).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recipes.common.claims import COMPARABLE, Claim, all_known, format_ci_comparison
from recipes.common.cli import recipe_main
from recipes.common.models import resolve_models
from recipes.common.plans import (
    SMOKE_MAS_OVERRIDES,
    PlannedRun,
    mas_config_from_preset,
    plan_rows,
    preset_path,
)
from recipes.common.plots import plot_grouped_bars
from recipes.common.report import (
    SMOKE_NOTE,
    fmt_ci,
    markdown_table,
    run_status_sections,
    write_csv,
    write_summary,
)

REPO = Path(__file__).resolve().parent.parent
METHODS = ("mas", "clmas", "clmas_partial_match", "latent_stitch", "behavioural_stitch", "reverse_behavioural_stitch",
           "random_alignment", "untrained_model")
ACCESSIBLE, INACCESSIBLE = (1, 0), (0, 1)   # (source, target): the target is the model intervened upon
HOW = {"mas": "behaviour (full access)", "clmas": "CL loss only",
       "clmas_partial_match": "CL loss only (targets matched on partial_match)", "latent_stitch": "CL loss only",
       "latent_stitch_partial_match": "CL loss only (targets matched on partial_match)",
       "behavioural_stitch": "behaviour of model 1 (needs access)",
       "reverse_behavioural_stitch": "transpose of a 1→0 stitch (model 0's behaviour)",
       "random_alignment": "untrained",
       "untrained_model": "behaviour (model 1 = untrained copy)"}


@dataclass
class RecipeConfig:
    models: list[str] = field(default_factory=lambda: ["multiobject-gru-s0", "multiobject-gru-s1"])
    site: str = "hidden"
    k: int = 64                       # MAS / CLMAS subspace size (the paper's CLMAS runs used 64 and 128)
    stitch_k: int = 128               # latent / behavioural stitch rank (the paper: the full width)
    epsilons: list[float] = field(default_factory=lambda: [0.5, 0.89, 0.94])
    partial_match: list[str] = field(default_factory=lambda: ["phase", "count"])  # clmas_partial_match's CL keys
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    mas_preset: str = "llm_mas/presets/gru_gru_hidden.yaml"
    mas_overrides: list[str] = field(default_factory=list)
    name: str = "clmas"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])

    def validate(self) -> list[str]:
        p = []
        if len(self.models) != 2:
            p.append(f"models: list exactly two models (0 accessible, 1 inaccessible), got {self.models}")
        if self.k < 1 or self.stitch_k < 1:
            p.append(f"k and stitch_k must be >= 1, got {self.k} and {self.stitch_k}")
        bad = [e for e in self.epsilons if not 0.0 <= e < 1.0]
        if bad:
            p.append(f"epsilons: CLMAS weights must lie in [0, 1), got {bad}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            p.append(f"methods: unknown {unknown}; valid: {', '.join(METHODS)}")
        if "clmas_partial_match" in self.methods and not self.partial_match:
            p.append("partial_match: list the state variables clmas_partial_match matches CL targets on")
        if not preset_path(self.mas_preset).exists():
            p.append(f"mas_preset {self.mas_preset!r} does not exist (tried the working directory and "
                     f"{REPO})")
        return p


def plan(config: RecipeConfig, models: list[str], overrides: list[str], mas_dir: Path,
         progress: bool = True) -> list[PlannedRun]:
    """The MAS runs in order (cheap stitches, MAS, CLMAS, then controls), each with its 4 direction rows."""
    def cfg(name, extra_overrides=(), untrained_1=False, **fields):
        entries = [{"name": m, "site": config.site, "untrained": untrained_1 and i == 1}
                   for i, m in enumerate(models)]
        return mas_config_from_preset(
            config.mas_preset, [*overrides, *extra_overrides], name=name, out_dir=str(mas_dir),
            seed=config.seed, device=config.device, progress=progress, models=entries, variables=["full"],
            **fields)

    def rows(method, epsilon=None, match_on=None):
        label = {"method": method, "epsilon": epsilon, "trained_0to1_by": HOW[method],
                 "cl_match_on": ",".join(match_on) if match_on else ""}
        return [({**label, "direction": "accessible 1→0"}, *ACCESSIBLE),
                ({**label, "direction": "inaccessible 0→1"}, *INACCESSIBLE),
                ({**label, "direction": "0→0"}, 0, 0), ({**label, "direction": "1→1"}, 1, 1)]

    k, sk = config.k, config.stitch_k
    runs = []
    # cheap one-direction stitches first, then the four-direction runs, controls last
    if "latent_stitch" in config.methods:
        runs.append(PlannedRun(cfg(f"latent_stitch_k{sk}", k=sk, directions=[[0, 1]], intervention="stitch",
                                   cl={"inaccessible": [1], "epsilon": 1.0}), rows("latent_stitch")))
    if "behavioural_stitch" in config.methods:
        runs.append(PlannedRun(cfg(f"behavioural_stitch_k{sk}", k=sk, directions=[[0, 1]],
                                   intervention="stitch"), rows("behavioural_stitch")))
    if "reverse_behavioural_stitch" in config.methods:
        runs.append(PlannedRun(cfg(f"reverse_behavioural_stitch_k{sk}", k=sk, directions=[[1, 0]],
                                   intervention="stitch"), rows("reverse_behavioural_stitch")))
    if "mas" in config.methods:
        runs.append(PlannedRun(cfg(f"mas_k{k}", k=k, directions="all"), rows("mas")))
    if "clmas" in config.methods:
        for eps in config.epsilons:
            runs.append(PlannedRun(cfg(f"clmas_eps{eps:g}_k{k}", k=k, directions="all",
                                       cl={"inaccessible": [1], "epsilon": eps}), rows("clmas", eps)))
    if "clmas_partial_match" in config.methods:
        pm = list(config.partial_match)
        runs.append(PlannedRun(cfg(f"latent_stitch_k{sk}_match-{'-'.join(pm)}", k=sk, directions=[[0, 1]],
                                   intervention="stitch", cl={"inaccessible": [1], "epsilon": 1.0, "match_on": pm}),
                               rows("latent_stitch_partial_match", None, pm)))
        for eps in config.epsilons:
            runs.append(PlannedRun(cfg(f"clmas_eps{eps:g}_k{k}_match-{'-'.join(pm)}", k=k, directions="all",
                                       cl={"inaccessible": [1], "epsilon": eps, "match_on": pm}),
                                   rows("clmas_partial_match", eps, pm)))
    if "random_alignment" in config.methods:
        runs.append(PlannedRun(cfg(f"random_alignment_k{k}", ["train.max_steps=0"], k=k, directions="all"),
                               rows("random_alignment")))
    if "untrained_model" in config.methods:
        runs.append(PlannedRun(cfg(f"untrained_model_k{k}", untrained_1=True, k=k, directions="all"),
                               rows("untrained_model")))
    return runs


# ================================================================================== table and claims
def _label(r: dict) -> str:
    method = r["method"].removesuffix("_partial_match")
    method += f" matched on {r['cl_match_on']}" if r["method"].endswith("_partial_match") else ""
    return method + (f" ε={r['epsilon']:g}" if r.get("epsilon") is not None else "")


def pivot(rows: list[dict]) -> list[dict]:
    """One line per method (CLMAS: per ε): IIA with CIs in both cross directions, self directions."""
    out = {}
    for r in rows:
        line = out.setdefault(_label(r), {"method": _label(r), "0→1 trained by": r["trained_0to1_by"]})
        line[r["direction"]] = fmt_ci(r) if r["direction"].startswith(("acc", "inacc")) else r["trial_iia"]
        if r["direction"].startswith("inacc") and "cl_unmatched" in r:
            line["CL unmatched (0→1)"] = f"{r['cl_unmatched']}/{r.get('n_pairs', '?')}"
    return list(out.values())


def _cell(rows: list[dict], method: str, direction: str, epsilon=None) -> dict:
    for r in rows:
        if r["method"] == method and r["direction"].startswith(direction) and r.get("epsilon") == epsilon:
            return r
    return {}


def _beats_all(rows: list[dict], epsilons: list[float], baselines: list[tuple[str, str]],
               clmas: str = "clmas") -> tuple[bool | None, str]:
    """Whether CLMAS (method `clmas`) at every ε is above every baseline ``(method, label)`` in the
    inaccessible direction."""
    verdicts, evidence = [], []
    for eps in epsilons:
        cl = _cell(rows, clmas, "inacc", eps)
        cells = [(label, _cell(rows, method, "inacc")) for method, label in baselines]
        if not all_known(cl.get("trial_iia"), *(c.get("trial_iia") for _, c in cells)):
            verdicts.append(None)
            evidence.append(f"ε={eps:g}: pending")
            continue
        verdicts.append(all(cl["trial_iia"] > c["trial_iia"] for _, c in cells))
        evidence.append(f"ε={eps:g}: " + ", ".join(f"vs {label} {format_ci_comparison(cl, c)}"
                                                   for label, c in cells))
    holds = None if not verdicts or None in verdicts else all(verdicts)
    return holds, "; ".join(evidence) + "."


def claims(rows: list[dict], epsilons: list[float]) -> list[Claim]:
    """The paper's claims for CLMAS and, when it ran, for CLMAS with partially matched CL targets."""
    out = []
    partial = next((r for r in rows if r["method"] == "clmas_partial_match"), None)
    variants = [("clmas", "CLMAS")] if partial is None or any(r["method"] == "clmas" for r in rows) else []
    if partial is not None:
        variants.append(("clmas_partial_match", f"CLMAS with CL targets matched on {partial['cl_match_on']}"))
    for method, name in variants:
        out.extend(_claims_for(rows, epsilons, method, name))
    return out


def _claims_for(rows: list[dict], epsilons: list[float], method: str, name: str) -> list[Claim]:
    out = []
    latent = "latent_stitch_partial_match" if method == "clmas_partial_match" else "latent_stitch"
    baselines = [(latent, "latent stitch" + (" (same CL targets)" if latent != "latent_stitch" else "")),
                 ("reverse_behavioural_stitch", "1→0-trained stitch")]
    holds, evidence = _beats_all(rows, epsilons, baselines, method)
    out.append(Claim(f"{name} is best in the inaccessible direction 0→1 among methods that never use model 1's "
                     "behaviour (above latent stitching and the transposed 1→0 behavioural stitch), for "
                     "every tested ε", holds, evidence))
    holds, evidence = _beats_all(rows, epsilons, [("behavioural_stitch", "0→1-trained behavioural stitch")],
                                 method)
    out.append(Claim(f"{name} is above behavioural stitching trained on 0→1 — a baseline that uses model 1's "
                     "behaviour, i.e. more access than CLMAS has — for every tested ε", holds, evidence))
    mas = _cell(rows, "mas", "acc")
    verdicts, evidence = [], []
    for eps in epsilons:
        cl = _cell(rows, method, "acc", eps)
        if not all_known(cl.get("trial_iia"), mas.get("trial_iia")):
            verdicts.append(None)
            evidence.append(f"ε={eps:g}: pending")
            continue
        verdicts.append(abs(cl["trial_iia"] - mas["trial_iia"]) <= COMPARABLE)
        evidence.append(f"ε={eps:g}: {name} vs MAS {format_ci_comparison(cl, mas)}")
    holds = None if not verdicts or None in verdicts else all(verdicts)
    out.append(Claim(f"{name} matches MAS in the accessible direction 1→0 (|difference| ≤ {COMPARABLE}), for "
                     "every tested ε", holds, "; ".join(evidence) + "."))
    return out


def notes(rows: list[dict]) -> str:
    controls = [f"{_label(r)} {r['direction']}: {fmt_ci(r)}" for r in rows
                if r["method"] in ("random_alignment", "untrained_model") and r["direction"][0] in "ai"]
    return "\n".join([
        "Notes:",
        "- *Behavioural stitching* is trained on 0→1 by model 1's behaviour under intervention: it needs "
        "the very access CLMAS does without (the paper's baseline, kept for comparison).",
        "- *Latent stitching* trains only 0→1 (CL loss); its 1→0 row applies the transposed maps untrained. "
        "The *reverse behavioural stitch* trains only 1→0 (model 0's behaviour); its 0→1 row is the "
        "transposed partial isometry, untrained in that direction — the behavioural stitch an experimenter "
        "without access to model 1 can build.",
        "- The core picks the best checkpoint (and stops early) by mean validation trial IIA over every "
        "trained direction, CL-trained ones included, so checkpoint selection of CLMAS / latent stitching "
        "reads model 1's behaviour; training gradients do not. A strictly inaccessible protocol would select "
        "by CL loss.",
        "- Controls (chance level): " + ("; ".join(controls) if controls else "pending") + ".",
    ])


def write_outputs(rows: list[dict], run_dir: Path, command: str, config: RecipeConfig, models: list[str],
                  seconds: float, smoke: bool = False) -> None:
    write_csv(rows, run_dir / "results.csv")
    labels = list(dict.fromkeys(_label(r) for r in rows))
    bars = {name: [next((r for r in rows if _label(r) == lab and r["direction"].startswith(prefix)), {})
                   for lab in labels]
            for name, prefix in (("accessible 1→0", "acc"), ("inaccessible 0→1", "inacc"))}
    plot_grouped_bars(labels, bars, run_dir / "iia_by_method.png",
                      f"CLMAS — model 1 ({Path(models[1]).name}) inaccessible")
    table = pivot(rows)
    columns = ["method", "0→1 trained by", "accessible 1→0", "inaccessible 0→1", "0→0", "1→1",
               "CL unmatched (0→1)"]
    sections = [
        f"Models: 0 = `{models[0]}` (accessible), 1 = `{models[1]}` (inaccessible), hidden state; MAS / "
        f"CLMAS k = {config.k}, stitches rank {config.stitch_k}. Validation trial IIA of the best checkpoint "
        f"with 95% bootstrap CIs; every direction evaluated by behaviour ({seconds:.0f} s this call; all "
        "rows in results.csv).",
        *([SMOKE_NOTE] if smoke else []),
        markdown_table(table, columns),
        notes(rows),
    ]
    sections.extend(run_status_sections(rows))
    write_summary(run_dir / "summary.md", "CLMAS with a causally inaccessible model", command, sections,
                  claims(rows, config.epsilons if {"clmas", "clmas_partial_match"} & set(config.methods) else []))


def build(config: RecipeConfig, run_dir: Path, smoke: bool, scratch_dir: Path | None) -> list[PlannedRun]:
    mapping = resolve_models(config.models, scratch_dir)
    overrides = [*config.mas_overrides, *(SMOKE_MAS_OVERRIDES if smoke else [])]
    return plan(config, [mapping[m] for m in config.models], overrides, run_dir / "mas",
                progress=not smoke and sys.stdout.isatty())


def write(config: RecipeConfig, plans: list[PlannedRun], outcomes: dict, run_dir: Path, command: str,
          seconds: float, smoke: bool) -> None:
    models = [m.name for m in plans[0].config.models] if plans else list(config.models)
    write_outputs(plan_rows(plans, outcomes), run_dir, command, config, models, seconds, smoke)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # small task models: more threads only add overhead
    return recipe_main(argv, name="clmas", doc=__doc__, config_cls=RecipeConfig, build=build,
                       write=write, outputs="results.csv, iia_by_method.png, summary.md")


if __name__ == "__main__":
    sys.exit(main())
