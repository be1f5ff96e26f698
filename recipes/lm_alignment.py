"""Aligning language models on a counting task: the shipped MultiObject LMs against each other, an untrained
copy, a narrower LM and the shipped GRU, through counterfactual runs (``data.task``); or the shipped binding
LMs on a counterfactual dataset at the query (``binding_counterfactual``, recipes/configs/lm_alignment_binding.yaml).

    python -m recipes.lm_alignment                      # recipes/configs/lm_alignment.yaml
    python -m recipes.lm_alignment recipes/configs/lm_alignment_binding.yaml
    python -m recipes.lm_alignment --smoke              # seconds
    python -m recipes.lm_alignment --only mas_s0_s1     # one run; --report rewrites the outputs

Runs (``llm_mas.run.run``; pairs of the MultiObject causal model rendered as text per tokenizer, variable
``variable`` swapped stepwise (every position 0..i; ``stepwise: false``: one position) at ``site``, k coordinates; every MAS run trains all four directions):
- ``mas_s0_s1``: two independently trained LMs of the same width (high IIA expected);
- ``mas_s0_untrained``: the first LM against an untrained copy (its config, fresh weights): chance;
- ``mas_s0_w96``: different widths (128 vs 96);
- ``das_{lm}``: DAS on each LM alone;
- ``mas_s0_gru``: the first LM against the shipped GRU (its token space is the task ids; positions
  correspond through the rendering), which direction transfers;
- ``das_s0_{site}``: DAS on the first LM at every site of ``layer_sites``: which layer carries the count.
With ``binding_counterfactual`` (``answer`` or ``query``, task binding) every run reads one counterfactual
dataset (``data.dataset``) that the recipe writes into its run folder from the binding causal model
(`llm_mas.tasks.binding.binding_counterfactual_rows`: both texts end at the queried name after '?',
where the answer is predicted and the intervention is; label: the source's answer, or the base's binding of the source's query name), with
``data.n_train + data.n_valid`` rows; ``gru: null`` leaves out the run against a GRU.
Outputs in ``runs/<name>/``: ``results.csv`` (run, direction, trial IIA with its 95 % bootstrap CI, token
IIA), ``lm_alignment.png``, ``summary.md``; ``--publish`` copies them to ``docs/results/<name>.{md,csv}``
and ``docs/figures/<name>.png`` (name: the config's). Restartable (finished runs are reused, unfinished ones resume).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_mas.resources import package_path
from recipes.common.cli import recipe_main
from recipes.common.plans import (
    REPO,
    SMOKE_MAS_OVERRIDES,
    PlannedRun,
    mas_config_from_preset,
    plan_rows,
    preset_path,
)
from recipes.common.plots import plot_grouped_bars
from recipes.common.report import (
    SMOKE_NOTE,
    early_stop_note,
    fmt_ci,
    markdown_table,
    write_csv,
    write_summary,
)

SHIPPED_LMS = package_path("data", "lms")
DIRECTIONS = (("A→B", 0, 1), ("B→A", 1, 0), ("A→A", 0, 0), ("B→B", 1, 1))


@dataclass
class RecipeConfig:
    lm_a: str = "multiobject-w128-s0"       # shipped LM names (llm_mas/data/lms) or LM directories
    lm_b: str = "multiobject-w128-s1"
    lm_narrow: str = "multiobject-w96-s2"
    gru: str | None = "multiobject-gru-s0"     # null: no run against a task model
    task: str = "multiobject"
    variable: str = "count"
    stepwise: bool = True                    # swap at every position 0..i (indywise: one position)
    site: str = "embeddings"                 # the LMs' site of the MAS runs
    gru_site: str = "hidden"
    layer_sites: list[str] = field(default_factory=lambda: ["embeddings", "layer0", "layer1"])
    k: int = 16
    mas_preset: str = "llm_mas/presets/gru_gru_hidden.yaml"   # the base of every run's config
    mas_overrides: list[str] = field(default_factory=lambda: [
        "data.n_train=2000", "data.n_valid=500", "train.batch_size=64", "train.max_steps=300",
        "train.eval_every=50", "train.lr=3e-3", "eval.batch_size=500"])
    name: str = "lm_alignment"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])
    # binding only: intervene at the queried name on a dataset from the causal model (answer | query)
    binding_counterfactual: str | None = None
    title: str = "Aligning language models on a counting task"

    def validate(self) -> list[str]:
        p = []
        for key in ("lm_a", "lm_b", "lm_narrow"):
            if not lm_dir(getattr(self, key)).is_dir():
                p.append(f"{key}: {getattr(self, key)!r} is neither a shipped LM ({', '.join(shipped_lms())}) "
                         "nor an LM directory")
        if self.k < 1:
            p.append(f"k must be >= 1, got {self.k}")
        if not self.layer_sites:
            p.append("layer_sites: list at least one site (embeddings, layer0, ...)")
        if self.binding_counterfactual is not None:
            from llm_mas.tasks.binding import CF_MODES

            if self.binding_counterfactual not in CF_MODES:
                p.append(f"binding_counterfactual must be one of {', '.join(CF_MODES)} or null, got "
                         f"{self.binding_counterfactual!r}")
            if self.task != "binding":
                p.append(f"binding_counterfactual needs task: binding, got task {self.task!r}")
        if not preset_path(self.mas_preset).exists():
            p.append(f"mas_preset {self.mas_preset!r} does not exist")
        return p


def shipped_lms() -> list[str]:
    return sorted(d.name for d in SHIPPED_LMS.iterdir() if d.is_dir())


def lm_dir(name: str) -> Path:
    """A shipped LM by name, else the directory as given."""
    return SHIPPED_LMS / name if (SHIPPED_LMS / name).is_dir() else Path(name)


def untrained_copy(name: str, out: Path, seed: int) -> Path:
    """`name`'s architecture and tokenizer with fresh random weights, saved once to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    source = lm_dir(name)
    generator_state = torch.random.get_rng_state()
    try:  # seeded initialisation without leaving the global generator changed
        torch.manual_seed(10_000 + seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _override(overrides: list[str], key: str) -> int:
    """The last integer value of `key` among `overrides` ("data.n_train=2000")."""
    values = [int(o.split("=", 1)[1]) for o in overrides if o.split("=", 1)[0].strip() == key]
    if not values:
        raise ValueError(f"{key} is not among the overrides {overrides}")
    return values[-1]


def binding_dataset(config: RecipeConfig, overrides: list[str], run_dir: Path) -> Path:
    """The counterfactual dataset of a ``binding_counterfactual`` config, written once into the run folder."""
    from llm_mas.tasks.binding import write_counterfactual_dataset

    n_rows = _override(overrides, "data.n_train") + _override(overrides, "data.n_valid")
    path = run_dir / f"binding_{config.binding_counterfactual}_{n_rows}_s{config.seed}.jsonl"
    if not path.is_file():
        write_counterfactual_dataset(path, n_rows, config.seed, config.binding_counterfactual)
    return path


def plan(config: RecipeConfig, overrides: list[str], mas_dir: Path, untrained: Path,
         progress: bool = True, dataset: Path | None = None) -> list[PlannedRun]:
    def lm(name, site=None):
        return {"kind": "hf", "name": str(lm_dir(name)), "site": site or config.site}

    def cfg(name, entries):
        data = ([f"data.dataset={dataset}"] if dataset is not None else
                [f"data.task={config.task}", f"data.stepwise={str(config.stepwise).lower()}"])
        return mas_config_from_preset(config.mas_preset, [*data, *overrides], name=name, out_dir=str(mas_dir),
                                      seed=config.seed, device=config.device, progress=progress, k=config.k,
                                      variables=["full" if dataset is not None else config.variable], directions="all", models=entries)

    def two(group, comparison, a, b, run_name, entries):
        return PlannedRun(cfg(run_name, entries), [({"group": group, "comparison": comparison, "model_a": a,
                                                      "model_b": b, "direction": d}, s, t) for d, s, t in DIRECTIONS])

    def one(group, comparison, a, run_name, entries):
        return PlannedRun(cfg(run_name, entries), [({"group": group, "comparison": comparison, "model_a": a,
                                                      "model_b": "(itself)", "direction": "A→A"}, 0, 0)])

    a, b, narrow = config.lm_a, config.lm_b, config.lm_narrow
    runs = [two("mas", "two seeds", a, b, "mas_s0_s1", [lm(a), lm(b)]),
            two("control", "untrained copy", a, f"{a} (untrained)", "mas_s0_untrained",
                [lm(a), {**lm(a), "name": str(untrained)}]),
            two("mas", "different widths", a, narrow, "mas_s0_w96", [lm(a), lm(narrow)])]
    if config.gru is not None:
        runs.append(two("gru", "LM vs GRU", a, config.gru, "mas_s0_gru",
                        [lm(a), {"kind": "task", "name": config.gru, "site": config.gru_site}]))
    for short, name in (("s0", a), ("s1", b), ("w96", narrow)):
        runs.append(one("das", f"DAS {name}", name, f"das_{short}", [lm(name)]))
    for site in config.layer_sites:
        runs.append(one("layer", f"DAS {a} @ {site}", a, f"das_s0_{site}", [lm(a, site)]))
    return runs


def summarise(rows: list[dict]) -> list[dict]:
    """One line per comparison: trial IIA (with CI) per direction."""
    out: dict[str, dict] = {}
    for r in rows:
        line = out.setdefault(r["comparison"], {"comparison": r["comparison"], "A": r["model_a"],
                                                "B": r["model_b"], "status": r["status"]})
        line[r["direction"]] = fmt_ci(r)
        line[r["direction"] + " token"] = f"{r['token_iia']:.3f}" if r["token_iia"] == r["token_iia"] else "–"
    return list(out.values())


def write(config: RecipeConfig, plans: list[PlannedRun], outcomes: dict, run_dir: Path, command: str,
          seconds: float, smoke: bool) -> None:
    rows = plan_rows(plans, outcomes)
    write_csv(rows, run_dir / "results.csv")
    lines = summarise(rows)
    groups = [li["comparison"] for li in lines]
    bars = {d: [next((r for r in rows if r["comparison"] == g and r["direction"] == d), {}) for g in groups]
            for d, _, _ in DIRECTIONS}
    what = (f"'{config.binding_counterfactual}' swapped at the queried name" if config.binding_counterfactual else
            f"`{config.variable}`")
    plot_grouped_bars(groups, bars, run_dir / "lm_alignment.png",
                      f"{config.task} LMs: {what} at {config.site}, k = {config.k}")
    columns = ["comparison", "A", "B", "A→B", "B→A", "A→A", "B→B", "status"]
    sections = [
        _data_sentence(config, seconds),
        *([SMOKE_NOTE] if smoke else []),
        markdown_table(lines, columns),
        *([early] if (early := early_stop_note(rows)) else []),
    ]
    write_summary(run_dir / "summary.md", config.title, command, sections, [])


def _data_sentence(config: RecipeConfig, seconds: float) -> str:
    iia = (f"LM site {config.site}, k = {config.k}. Validation trial IIA (every scored continuation token right, "
           f"teacher forced) with 95 % bootstrap CIs; A→B: source A, B intervened upon ({seconds:.0f} s this "
           "call; token IIA and every row in results.csv).")
    if config.binding_counterfactual:
        label = ("label = the source's answer" if config.binding_counterfactual == "answer" else
                 "label = the base's binding of the source's query name")
        return (f"Task binding, a counterfactual dataset intervening at the queried name (after '?') in base and source "
                f"(`{config.binding_counterfactual}` swapped: {label}; informative pairs only, N = 1..6 "
                f"bindings; `llm_mas.tasks.binding.binding_counterfactual_rows`), {iia}")
    return (f"Task {config.task}, variable `{config.variable}` swapped "
            f"{'stepwise' if config.stepwise else 'indywise'} (pairs from the causal model, rendered as text per "
            f"tokenizer; the GRU reads the task ids), GRU site {config.gru_site}, {iia}")


def build(config: RecipeConfig, run_dir: Path, smoke: bool, scratch_dir: Path | None) -> list[PlannedRun]:
    overrides = [*config.mas_overrides, *(SMOKE_MAS_OVERRIDES if smoke else [])]
    untrained = untrained_copy(config.lm_a, run_dir / "untrained_lm", config.seed)
    dataset = binding_dataset(config, overrides, run_dir) if config.binding_counterfactual else None
    return plan(config, overrides, run_dir / "mas", untrained, progress=not smoke and sys.stdout.isatty(),
                dataset=dataset)


def publish(run_dir: Path, docs: Path = REPO / "docs", stem: str = "lm_alignment") -> None:
    """Copy the outputs to docs/results/<stem>.{md,csv} and docs/figures/<stem>.png (stem: the config's name)."""
    (docs / "results").mkdir(parents=True, exist_ok=True)
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "summary.md", docs / "results" / f"{stem}.md")
    shutil.copyfile(run_dir / "results.csv", docs / "results" / f"{stem}.csv")
    shutil.copyfile(run_dir / "lm_alignment.png", docs / "figures" / f"{stem}.png")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    publish_after = "--publish" in argv
    argv = [a for a in argv if a != "--publish"]
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    code = recipe_main(argv, name="lm_alignment", doc=__doc__, config_cls=RecipeConfig, build=build, write=write,
                       outputs="results.csv, lm_alignment.png, summary.md")
    if publish_after and code == 0:
        from llm_mas.config import load_config

        config_path = next((a for a in argv if a.endswith(".yaml")), str(REPO / "recipes/configs/lm_alignment.yaml"))
        config = load_config(RecipeConfig, config_path, [a for a in argv if "=" in a and not a.startswith("--")])
        publish(Path(config.out_dir) / (config.name + ("-smoke" if "--smoke" in argv else "")), stem=config.name)
    return code


if __name__ == "__main__":
    sys.exit(main())
