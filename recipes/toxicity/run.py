"""Toxicity case study (docs/method.md): LoRA fine-tunes in groups (the paper: toxic / nontoxic × 3 disjoint
data splits; ``organisms``: trait / clean / shift model organisms trained here, ``llm_mas.llm.organisms``) →
recorded generations → one stepwise MAS run over all models → a report with group means, bootstrap CIs and
permutation tests over model labels.

    python -m recipes.toxicity.run --smoke              # tiny offline models + bundled sample, CPU, a few minutes
    python -m recipes.toxicity.run organisms            # model organisms (configs/organisms.yaml), CPU, ~70 min
    python -m recipes.toxicity.run organisms --smoke    # the same in under a minute (CI)
    python -m recipes.toxicity.run                      # DeepSeek-R1-Distill-Qwen-1.5B, one GPU (configs/deepseek.yaml)
    python -m recipes.toxicity.run processes=4          # 4 GPUs: fine-tuning and MAS through `accelerate launch`
    python -m recipes.toxicity.run CONFIG.yaml key.sub=value ...   # another preset and/or overrides
    python -m recipes.toxicity.run --dry-run            # write RUN/commands.sh and show what would run
    python -m recipes.toxicity.run --report-only        # rewrite the report from the finished MAS run (= --report)
    python -m recipes.toxicity.run organisms --only finetune,trait-0   # only these stages (others: reused if done)

Every stage is an ordinary ``llm-mas`` command (listed in ``RUN/commands.sh``; run them yourself to change
anything), and every finished stage is skipped on the next call, so after a kill the same command continues:

1. base model: the hub id / directory in ``base_model``; ``base_model: tiny`` builds a random-weight tiny
   Qwen2 offline (``llm_mas.llm.tiny.build_tiny_qwen2``) into ``RUN/base-model``;
   ``base_model: organisms`` is the shipped organisms base LM (``llm_mas/data/lms/organisms-w64-s0``); with
   ``organisms:`` set, the groups' data are written into ``RUN/data/`` first;
2. ``llm-mas finetune --mode toxic|nontoxic --split K --merge --out RUN/finetune/<group>-<K>`` for every
   group (``groups``, each with its own finetune settings) and split (done = ``result.json``; an
   interrupted one is continued with ``--resume``);
3. ``RUN/prompts.jsonl``: the test-role texts of the fine-tuning data (``toxicity_corpus("both", None,
   role="test", balance=False)``; a local file has no test split and is used whole), and
   ``llm-mas record --model RUN/finetune/<v>/merged --texts RUN/prompts.jsonl --out RUN/recordings/<v>``
   (every model gets the same prompts: same texts, same seed, same tokenizer);
4. ``llm-mas mas RUN/mas.yaml``: stepwise MAS at the embeddings between all models (one alignment per
   model, all n² directions trained jointly; ``k`` defaults to d/2) into ``RUN/mas/``; with
   ``counterfactual:`` also ``llm-mas mas RUN/mas_cf.yaml`` (the counterfactual-dataset form, ``RUN/mas-cf/``);
5. organisms only: ``RUN/traits.json``, what every model does on held-out prompts (``trait_rates``);
6. ``RUN/report.md`` (+ ``report.json``, ``iia_token.csv``, ``iia_trial.csv``, ``iia_matrices.png``,
   ``group_means.png``, ``label_permutation.png``), computed by ``recipes.toxicity.report``.

A finished stage whose saved settings differ from the config (or whose inputs are newer than it) is an error
that names the directory: delete it, or choose another ``name=``, to redo that stage. Run directory:
``<out_dir>/<name>``. See recipes/toxicity/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from llm_mas.cli import app
from llm_mas.commands.llm import read_texts
from llm_mas.config import from_dict, load_config, save_config, to_dict
from llm_mas.dtypes import DTYPES, WEIGHT_DTYPES
from llm_mas.errors import ConfigError, DataError, MASError
from llm_mas.llm import organisms
from llm_mas.llm.tiny import build_tiny_qwen2, tiny_corpus
from llm_mas.resources import package_path
from llm_mas.results import MASResult
from llm_mas.run_config import MASConfig, ModelConfig
from llm_mas.toxicity.data import toxicity_corpus
from llm_mas.toxicity.finetune import RESUME_MAY_DIFFER, FinetuneConfig
from recipes.common.cli import RecipeInvocation, recipe_front_door
from recipes.common.plans import same_config
from recipes.toxicity.report import CONTRASTS, DEFAULT_TESTS, analyze_iia, plot_report, report_markdown

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_PRESET = HERE / "configs" / "deepseek.yaml"
SMOKE_PRESET = HERE / "configs" / "smoke.yaml"
MODES = ("toxic", "nontoxic")
TINY = "tiny"
ORGANISMS = "organisms"           # base_model: the shipped organisms base LM; record.texts: base-language prompts
ORGANISMS_LM = "organisms-w64-s0"  # llm_mas/data/lms/<this>
RUN_PLACEHOLDER = "{run}"         # in a group's finetune values: the run directory
# FinetuneConfig / ModelConfig / MASConfig fields the recipe sets itself (not allowed in the config's dicts)
FINETUNE_OWN = ("model", "out", "mode", "split", "merge", "resume", "progress")
MODEL_OWN = ("name", "kind", "recording", "adapter", "untrained")
MAS_OWN = ("models", "name", "out_dir")
RECORD_META_KEYS = ("prompt_len", "total_len", "n_requested", "seed")


# ============================================================================================ config
@dataclass
class RecordSettings:
    """``llm-mas record`` settings, the same for every model."""

    texts: str = "test"         # test (the data's test role) | tiny | organisms | a .txt / .jsonl file
    n: int = 1000               # prompts (texts with >= prompt_len tokens)
    prompt_len: int = 32
    total_len: int = 64
    batch_size: int = 16
    dtype: str = "float32"      # float32 | bfloat16 | float16 | auto (use the MAS models' dtype)
    device: str = "auto"
    seed: int = 0               # order in which texts are tried

    def validate(self) -> list[str]:
        p = []
        if self.texts not in ("test", TINY, ORGANISMS) and not Path(self.texts).is_file():
            p.append(f"record.texts={self.texts!r} is neither 'test', 'tiny', 'organisms' nor an existing "
                     f".txt/.jsonl file")
        if self.prompt_len < 1 or self.total_len <= self.prompt_len:
            p.append(f"record: need 1 <= prompt_len < total_len, got {self.prompt_len} and {self.total_len}")
        if self.total_len - 1 < 20:
            p.append(f"record.total_len={self.total_len} is too short for stepwise MAS (the step i is drawn from "
                     f"[10, total_len - 1 - 10)); use >= 21")
        for name in ("n", "batch_size"):
            if getattr(self, name) < 1:
                p.append(f"record.{name}={getattr(self, name)} must be >= 1")
        return p


@dataclass
class ReportSettings:
    """Statistics of the report (``recipes.toxicity.report.analyze_iia``)."""

    n_boot: int = 2000
    level: float = 0.95
    alpha: float = 0.05
    n_perm: int = 10_000        # exact enumeration up to this many labellings (20 for 3 + 3 models)
    seed: int = 0
    # [contrast, group, alternative] or [contrast, group, versus, alternative]; None: the paper's tests
    # (recipes.toxicity.report.DEFAULT_TESTS) for toxic / nontoxic groups
    tests: list[list[Any]] | None = None
    title: str = "Toxicity case study: stepwise MAS between toxic and nontoxic fine-tunes"
    baseline_pairs: int = 1000  # stepwise pairs per direction of the no-alignment baselines (organisms runs)

    def test_specs(self) -> list[tuple]:
        if self.tests is None:
            return list(DEFAULT_TESTS)
        return [tuple(t) for t in self.tests]

    def validate(self) -> list[str]:
        p = []
        for t in self.tests or []:
            if not isinstance(t, (list, tuple)) or len(t) not in (3, 4) or t[0] not in CONTRASTS:
                p.append(f"report.tests entry {t!r} must be [contrast, group, alternative] or [contrast, group, "
                         f"versus, alternative] with contrast one of {', '.join(CONTRASTS)}")
        if self.baseline_pairs < 1:
            p.append(f"report.baseline_pairs={self.baseline_pairs} must be >= 1")
        if self.n_boot < 1 or self.n_perm < 1:
            p.append(f"report.n_boot={self.n_boot} and report.n_perm={self.n_perm} must be >= 1")
        if not 0 < self.level < 1 or not 0 < self.alpha < 1:
            p.append(f"report.level={self.level} and report.alpha={self.alpha} must lie in (0, 1)")
        return p


@dataclass
class ToxicityRecipeConfig:
    """Everything the recipe runs; YAML presets in recipes/toxicity/configs/, ``key.sub=value`` overrides."""

    name: str = "toxicity"
    out_dir: str = "runs"
    base_model: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"   # hub id, directory, "tiny" or "organisms"
    tiny_seed: int = 0                  # weights of the tiny base model (base_model: tiny)
    splits: list[int] = field(default_factory=lambda: [0, 1, 2])
    processes: int = 1                  # > 1: `accelerate launch --multi_gpu --num_processes N` (GPUs)
    in_process: bool = False            # run the llm-mas commands inside this process (CPU smoke runs)
    smoke: bool = False                 # marks the report as a smoke run (numbers mean nothing)
    # fine-tuning groups, each {name, mode (toxic | nontoxic | both), finetune: {FinetuneConfig fields}}; the
    # group's finetune fields override the shared ones ("{run}" in a value = the run directory)
    groups: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "toxic", "mode": "toxic"},
                                                                  {"name": "nontoxic", "mode": "nontoxic"}])
    # model organisms (llm_mas.llm.organisms): {n_texts, seed, probe_n}; writes RUN/data/paired.jsonl (trait +
    # clean rows) and RUN/data/shift.jsonl, and measures every fine-tune's trait rates into RUN/traits.json
    organisms: dict[str, Any] | None = None
    # the counterfactual-dataset form (organisms only): {n_rows, groups: [a, b], mas: {MASConfig fields}}: a MAS
    # run over the models of two groups on RUN/data/counterfactual.jsonl (organisms.counterfactual_rows), which
    # swaps the variable the trait hangs on (trigger place or not) between models; into RUN/mas-cf
    counterfactual: dict[str, Any] | None = None
    finetune: dict[str, Any] = field(default_factory=dict)   # FinetuneConfig fields (batch_size: over all processes)
    record: RecordSettings = field(default_factory=RecordSettings)
    model: dict[str, Any] = field(default_factory=lambda: {"site": "embeddings"})  # ModelConfig fields
    mas: dict[str, Any] = field(default_factory=dict)        # MASConfig fields except models/name/out_dir
    report: ReportSettings = field(default_factory=ReportSettings)

    def validate(self) -> list[str]:
        p = []
        if not self.name or "/" in self.name:
            p.append(f"name={self.name!r} must be a non-empty directory name without '/'")
        if not self.base_model:
            p.append("base_model is required: a hub id, a model directory, or 'tiny'")
        if len(set(self.splits)) != len(self.splits) or len(self.splits) < 2:
            p.append(f"splits={self.splits} must be at least two distinct split indices (the paper: [0, 1, 2])")
        if self.processes < 1:
            p.append(f"processes={self.processes} must be >= 1")
        if self.processes > 1 and self.in_process:
            p.append("in_process=true runs one process; with processes > 1 set in_process=false "
                     "(accelerate launch starts the processes)")
        for section, own in (("finetune", FINETUNE_OWN), ("model", MODEL_OWN), ("mas", MAS_OWN)):
            clash = [k for k in getattr(self, section) if k in own]
            if clash:
                p.append(f"{section}: {', '.join(clash)} are set by the recipe; remove them "
                         f"(keys it owns: {', '.join(own)})")
        p += self._group_problems()
        if self.organisms is not None:
            bad = [k for k in self.organisms if k not in ORGANISM_KEYS]
            if bad:
                p.append(f"organisms: unknown keys {bad}; valid: {', '.join(ORGANISM_KEYS)}")
        names = [g.get("name") for g in self.groups if isinstance(g, dict)]
        if self.counterfactual is not None:
            cf = self.counterfactual
            bad = [k for k in cf if k not in ("n_rows", "groups", "mas")]
            if bad:
                p.append(f"counterfactual: unknown keys {bad}; valid: n_rows, groups, mas")
            if self.organisms is None:
                p.append("counterfactual needs organisms (its dataset is organisms.counterfactual_rows); set "
                         "organisms or drop counterfactual")
            chosen = cf.get("groups", names[:2])
            if not isinstance(chosen, list) or len(chosen) != 2 or any(g not in names for g in chosen):
                p.append(f"counterfactual.groups={chosen!r} must name two of the groups ({', '.join(map(str, names))})")
        for t in self.report.tests or []:
            if isinstance(t, (list, tuple)) and len(t) in (3, 4):
                wanted = [x for x in (t[1], t[2] if len(t) == 4 else None) if x is not None]
                missing = [x for x in wanted if x not in names]
                if missing:
                    p.append(f"report.tests entry {list(t)} names groups {missing} that are not in groups "
                             f"({', '.join(map(str, names))})")
        try:
            ft = from_dict(FinetuneConfig, {**self._finetune_fields(), "model": "m", "out": "o"})
        except ConfigError as e:
            p += [f"finetune: {x}" for x in e.problems]
        else:
            bad = [s for s in self.splits if not 0 <= s < ft.n_splits]
            if bad:
                p.append(f"splits {bad} lie outside 0..{ft.n_splits - 1} (finetune.n_splits={ft.n_splits})")
            total = self.finetune.get("batch_size", FinetuneConfig.batch_size)
            if isinstance(total, int) and total % self.processes:
                p.append(f"finetune.batch_size={total} (rows per micro-batch over all processes) must be a multiple "
                         f"of processes={self.processes}, e.g. {max(1, total // self.processes) * self.processes}")
        if self.model.get("dtype", "float32") not in WEIGHT_DTYPES:
            p.append(f"model.dtype={self.model['dtype']!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        if self.record.dtype not in DTYPES:
            p.append(f"record.dtype={self.record.dtype!r} is not one of {', '.join(DTYPES)}")
        model_fields = {**self.model, "name": "m", "kind": "hf", "recording": "r"}
        try:
            from_dict(ModelConfig, model_fields)
        except ConfigError as e:
            p += [f"model: {x}" for x in e.problems]
        try:
            from_dict(MASConfig, {**self.mas, "models": [model_fields] * len(self.groups) * len(self.splits)})
        except ConfigError as e:
            p += [f"mas: {x}" for x in e.problems]
        if self.processes > 1 and "device" in self.model:
            p.append("model.device must be unset with processes > 1 (each process puts every model on its own GPU)")
        return p

    def _group_problems(self) -> list[str]:
        p = []
        if not isinstance(self.groups, list) or len(self.groups) < 2:
            return [f"groups={self.groups!r} must list at least two groups, e.g. [{{name: toxic, mode: toxic}}, "
                    f"{{name: nontoxic, mode: nontoxic}}]"]
        names = []
        for g in self.groups:
            if not isinstance(g, dict) or not g.get("name") or "/" in str(g["name"]) or "-" in str(g["name"]):
                p.append(f"groups entry {g!r} needs a name without '/' or '-' (it names the fine-tunes NAME-SPLIT)")
                continue
            names.append(g["name"])
            extra = [k for k in g if k not in ("name", "mode", "finetune")]
            if extra:
                p.append(f"groups entry {g['name']!r}: unknown keys {extra}; valid: name, mode, finetune")
            if g.get("mode") not in ("toxic", "nontoxic", "both"):
                p.append(f"groups entry {g['name']!r}: mode={g.get('mode')!r} must be toxic, nontoxic or both")
            clash = [k for k in g.get("finetune") or {} if k in FINETUNE_OWN]
            if clash:
                p.append(f"groups entry {g['name']!r}: finetune keys {clash} are set by the recipe; remove them")
        if len(set(names)) != len(names):
            p.append(f"group names {names} must be distinct")
        return p

    def _finetune_fields(self) -> dict[str, Any]:
        fields = dict(self.finetune)
        if "batch_size" in fields and self.processes > 1 and isinstance(fields["batch_size"], int):
            fields["batch_size"] = max(1, fields["batch_size"] // self.processes)
        return fields


ORGANISM_KEYS = ("n_texts", "seed", "probe_n")


def load_recipe_config(path: str | Path, overrides: list[str]) -> ToxicityRecipeConfig:
    """Preset + overrides → validated config (every problem at once)."""
    return load_config(ToxicityRecipeConfig, path, overrides)


# ============================================================================================ stages
@dataclass
class Variant:
    """One fine-tune: ``toxic-0`` ... ``nontoxic-2`` (``<group>-<split>``)."""

    mode: str
    split: int
    group: str = ""
    finetune: dict[str, Any] = field(default_factory=dict)   # the group's own FinetuneConfig fields

    def __post_init__(self) -> None:
        self.group = self.group or self.mode

    @property
    def name(self) -> str:
        return f"{self.group}-{self.split}"


def variants(config: ToxicityRecipeConfig) -> list[Variant]:
    """Group by group (config order), each in split order (the rows/columns of the IIA matrix)."""
    return [Variant(g["mode"], split, g["name"], dict(g.get("finetune") or {}))
            for g in config.groups for split in config.splits]


@dataclass
class Stage:
    """One command of the recipe: its words (``llm-mas ...`` or ``accelerate launch ...``) and status."""

    name: str
    argv: list[str]
    status: str          # done | run | resume
    note: str = ""

    @property
    def shell(self) -> str:
        return shlex.join(self.argv)


class Paths:
    """Where everything of one recipe run lives (``<out_dir>/<name>/...``)."""

    def __init__(self, config: ToxicityRecipeConfig):
        self.run = Path(config.out_dir).resolve() / config.name
        self.base = self.run / "base-model"
        self.prompts = self.run / "prompts.jsonl"
        self.mas_yaml = self.run / "mas.yaml"
        self.mas = self.run / "mas"
        self.cf_yaml = self.run / "mas_cf.yaml"
        self.cf = self.run / "mas-cf"
        self.cf_data = self.run / "data" / "counterfactual.jsonl"
        self.full = bool(config.finetune.get("full", False))

    def finetune(self, v: Variant) -> Path:
        return self.run / "finetune" / v.name

    def model(self, v: Variant) -> Path:
        """The plain model MAS and recording load: LoRA merged into the base, or the full fine-tune."""
        return self.finetune(v) / ("model" if self.full else "merged")

    def recording(self, v: Variant) -> Path:
        return self.run / "recordings" / v.name


def _progress() -> bool:
    return sys.stderr.isatty()


def _launcher(config: ToxicityRecipeConfig, mixed_precision: str) -> list[str]:
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(config.processes), "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]


def base_model_path(config: ToxicityRecipeConfig, paths: Paths) -> str:
    if config.base_model == ORGANISMS:
        return str(package_path("data", "lms", ORGANISMS_LM))
    return str(paths.base) if config.base_model == TINY else config.base_model


def _group_fields(v: Variant, paths: Paths) -> dict[str, Any]:
    return {k: value.replace(RUN_PLACEHOLDER, str(paths.run)) if isinstance(value, str) else value
            for k, value in v.finetune.items()}


def finetune_config(config: ToxicityRecipeConfig, paths: Paths, v: Variant, *, resume: bool = False):
    """The ``FinetuneConfig`` of one variant (batch_size per process)."""
    return from_dict(FinetuneConfig, {**config._finetune_fields(), **_group_fields(v, paths),
                                      "model": base_model_path(config, paths),
                                      "out": str(paths.finetune(v)), "mode": v.mode, "split": v.split,
                                      "merge": not config.finetune.get("full", False), "resume": resume,
                                      "progress": _progress()})


def _saved_differences(saved_yaml: Path, now: dict[str, Any], ignore: tuple[str, ...]) -> list[str]:
    saved = yaml.safe_load(saved_yaml.read_text()) or {}
    return [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
            if k not in ignore and saved.get(k) != v]


def finetune_stage(config: ToxicityRecipeConfig, paths: Paths, v: Variant) -> Stage:
    """Done when ``result.json`` exists (with the same settings); resumed when a run was started."""
    out = paths.finetune(v)
    started = (out / "config.yaml").is_file() or (out / "checkpoints").is_dir()
    cfg = finetune_config(config, paths, v, resume=started)
    status = "run"
    if started:
        diffs = _saved_differences(out / "config.yaml", to_dict(cfg), RESUME_MAY_DIFFER) \
            if (out / "config.yaml").is_file() else []
        if diffs:
            raise ConfigError([f"{out} holds a fine-tune with other settings; delete it (or choose another "
                               f"name=) to redo it:"] + diffs)
        status = "done" if (out / "result.json").is_file() and paths.model(v).is_dir() else "resume"
    argv = finetune_argv(cfg, explicit=[*config.finetune, *v.finetune, "merge", "progress",
                                        *(["resume"] if cfg.resume else [])])
    if config.processes > 1:
        argv = _launcher(config, cfg.mixed_precision or "no") + ["-m", "llm_mas.cli"] + argv[1:]
    return Stage(f"finetune {v.name}", argv, status)


def finetune_argv(cfg, explicit: list[str]) -> list[str]:
    """``llm-mas finetune`` words for `cfg`: model, out, mode, split and every field named in `explicit`
    (what the preset sets, so the command shows the settings even where they equal today's defaults)."""
    words = ["llm-mas", "finetune", "--model", cfg.model, "--mode", cfg.mode, "--split", str(cfg.split),
             "--out", cfg.out]
    for name in dict.fromkeys(explicit):
        value = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            words += [flag, ",".join(value)]
        elif value is not None:
            words += [flag, str(value)]
    return words


def _newest_weights(directory: Path) -> float:
    files = list(directory.glob("*.safetensors")) + list(directory.glob("*.bin"))
    return max((f.stat().st_mtime for f in files), default=0.0)


def record_stage(config: ToxicityRecipeConfig, paths: Paths, v: Variant) -> Stage:
    """Done when the recording exists with the same settings and is newer than its model."""
    r = config.record
    out = paths.recording(v)
    argv = ["llm-mas", "record", "--model", str(paths.model(v)), "--texts", str(paths.prompts), "--out", str(out),
            "--n", str(r.n), "--prompt-len", str(r.prompt_len), "--total-len", str(r.total_len),
            "--batch-size", str(r.batch_size), "--seed", str(r.seed), "--dtype", r.dtype, "--device", r.device,
            "--progress" if _progress() else "--no-progress"]
    meta_file, tensors = out / "recording.json", out / "recording.safetensors"
    if not (meta_file.is_file() and tensors.is_file()):
        return Stage(f"record {v.name}", argv, "run")
    meta = json.loads(meta_file.read_text())
    want = {"prompt_len": r.prompt_len, "total_len": r.total_len, "n_requested": r.n, "seed": r.seed}
    diffs = [f"{k}: saved {meta.get(k)!r}, now {want[k]!r}" for k in RECORD_META_KEYS if meta.get(k) != want[k]]
    if paths.prompts.is_file():
        prompts = set(_read_prompts(paths.prompts))
        if any(t not in prompts for t in meta.get("texts", [])):
            diffs.append(f"its texts are not all in {paths.prompts} (the prompts changed)")
    if _newest_weights(paths.model(v)) > tensors.stat().st_mtime:
        diffs.append(f"the model {paths.model(v)} was written after the recording")
    if diffs:
        raise ConfigError([f"{out} is a recording with other settings or inputs; delete it to record again:"]
                          + diffs)
    return Stage(f"record {v.name}", argv, "done")


def mas_config(config: ToxicityRecipeConfig, paths: Paths):
    """The ``MASConfig`` of the joint n-model run (models in ``variants`` order)."""
    models = [{**config.model, "name": str(paths.model(v)), "kind": "hf", "recording": str(paths.recording(v))}
              for v in variants(config)]
    fields = {"progress": _progress(), **config.mas, "models": models, "name": paths.mas.name,
              "out_dir": str(paths.run)}
    return from_dict(MASConfig, fields)


def cf_groups(config: ToxicityRecipeConfig) -> list[str]:
    return list((config.counterfactual or {}).get("groups") or [g["name"] for g in config.groups[:2]])


def cf_mas_config(config: ToxicityRecipeConfig, paths: Paths):
    """The ``MASConfig`` of the counterfactual-dataset run: the models of two groups, one variable (full)."""
    cf = config.counterfactual or {}
    groups = cf_groups(config)
    models = [{**config.model, "name": str(paths.model(v)), "kind": "hf"} for v in variants(config)
              if v.group in groups]
    own = dict(cf.get("mas") or {})
    data = {"n_train": 1000, "n_valid": 200, **own.pop("data", {}), "dataset": str(paths.cf_data)}
    shared = {k: v for k, v in config.mas.items() if k != "data"}
    fields = {"progress": _progress(), **shared, **own, "data": data, "variables": ["full"], "models": models,
              "name": paths.cf.name, "out_dir": str(paths.run)}
    return from_dict(MASConfig, fields)


def cf_stage(config: ToxicityRecipeConfig, paths: Paths) -> Stage:
    """Done when ``RUN/mas-cf/results.json`` exists for this config."""
    cfg = cf_mas_config(config, paths)
    argv = ["llm-mas", "mas", str(paths.cf_yaml)]
    if not (paths.cf / "config.yaml").is_file():
        return Stage("mas counterfactual", argv, "run")
    if not same_config(paths.cf, cfg):
        raise ConfigError(f"{paths.cf} holds a MAS run of another config (compare {paths.cf / 'config.yaml'} with "
                          f"{paths.cf_yaml}); delete it (or choose another name=) to run it again")
    return Stage("mas counterfactual", argv, "done" if (paths.cf / "results.json").is_file() else "resume")


def mas_stage(config: ToxicityRecipeConfig, paths: Paths) -> Stage:
    """Done when ``RUN/mas/results.json`` exists for this config and is newer than every recording."""
    cfg = mas_config(config, paths)
    if config.processes > 1:
        argv = _launcher(config, "no") + ["-m", "llm_mas.distributed", str(paths.mas_yaml)]
    else:
        argv = ["llm-mas", "mas", str(paths.mas_yaml)]
    started = (paths.mas / "config.yaml").is_file()
    if not started:
        return Stage("mas", argv, "run")
    if not same_config(paths.mas, cfg):
        raise ConfigError(f"{paths.mas} holds a MAS run of another config (compare {paths.mas / 'config.yaml'} "
                          f"with {paths.mas_yaml}); delete it (or choose another name=) to run MAS again")
    results = paths.mas / "results.json"
    if not results.is_file():
        return Stage("mas", argv, "resume", "continues from its checkpoint" if (paths.mas / "checkpoint.pt").exists()
                     else "")
    newer = [str(paths.recording(v)) for v in variants(config)
             if (paths.recording(v) / "recording.safetensors").is_file()
             and (paths.recording(v) / "recording.safetensors").stat().st_mtime > results.stat().st_mtime]
    if newer:
        raise ConfigError(f"{paths.mas} predates the recordings {', '.join(newer)}; delete it to run MAS again")
    return Stage("mas", argv, "done")


# ============================================================================================ inputs
def _read_prompts(path: Path) -> list[str]:
    return read_texts(path)


def prompt_texts(config: ToxicityRecipeConfig) -> list[str]:
    """The recording prompts: the data's test role, tiny_corpus, or a file (module docstring, step 3)."""
    r = config.record
    if r.texts == TINY:
        return tiny_corpus(max(300, 2 * r.n), seed=2024)
    if r.texts == ORGANISMS:  # base-language texts from a seed the base LM and the fine-tunes never saw
        return organisms.base_texts(max(300, 2 * r.n), seed=2024)
    if r.texts == "test":
        ft = config.finetune
        return list(toxicity_corpus("both", None, ft.get("n_splits", 3), sources=ft.get("sources"),
                                    data=ft.get("data", "hub"), seed=ft.get("seed", 42), balance=False,
                                    role="test"))
    return _read_prompts(Path(r.texts))


def prepare_inputs(config: ToxicityRecipeConfig, paths: Paths, log=print) -> None:
    """The tiny base model (``base_model: tiny``) and ``prompts.jsonl`` (rewritten only when it changes)."""
    if config.base_model == TINY and not (paths.base / "config.json").is_file():
        build_tiny_qwen2(paths.base, seed=config.tiny_seed)
        log(f"built a tiny random-weight Qwen2 (seed {config.tiny_seed}) in {paths.base}")
    if config.organisms is not None:
        o = config.organisms
        rows = organisms.finetune_rows(int(o.get("n_texts", 3000)), seed=int(o.get("seed", 1)))
        for name, data in (("paired.jsonl", rows["trait"] + rows["clean"]), ("shift.jsonl", rows["shift"])):
            target = paths.run / "data" / name
            text = "".join(json.dumps(r) + "\n" for r in data)
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                log(f"wrote {target} ({len(data)} rows)")
        if config.counterfactual is not None:
            text = "".join(json.dumps(r) + "\n" for r in
                           organisms.counterfactual_rows(int(config.counterfactual.get("n_rows", 1200))))
            if not paths.cf_data.is_file() or paths.cf_data.read_text(encoding="utf-8") != text:
                paths.cf_data.write_text(text, encoding="utf-8")
                log(f"wrote {paths.cf_data} ({text.count(chr(10))} rows)")
    text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in prompt_texts(config))
    if not paths.prompts.is_file() or paths.prompts.read_text(encoding="utf-8") != text:
        paths.prompts.parent.mkdir(parents=True, exist_ok=True)
        paths.prompts.write_text(text, encoding="utf-8")
        log(f"wrote {paths.prompts} ({text.count(chr(10))} texts)")


# ============================================================================================ running
def execute(stage: Stage, config: ToxicityRecipeConfig) -> None:
    """Run one stage: in this process (``llm-mas`` commands, ``in_process: true``) or as a subprocess."""
    if config.in_process and stage.argv[0] == "llm-mas":
        try:
            app(stage.argv[1:], prog_name="llm-mas", standalone_mode=False)
        except SystemExit as e:  # run_command turns a MASError into exit status 2 after printing it
            if e.code not in (0, None):
                raise MASError(f"{stage.name} failed (exit {e.code}; message above). Fix it and rerun the recipe: "
                               f"finished stages are skipped") from None
        return
    prefix = {"llm-mas": [sys.executable, "-m", "llm_mas.cli"],
              "accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"]}[stage.argv[0]]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    code = subprocess.run(prefix + stage.argv[1:], env=env).returncode
    if code != 0:
        raise MASError(f"{stage.name} failed (exit {code}; message above). Fix it and rerun the recipe: finished "
                       f"stages are skipped")


def plan(config: ToxicityRecipeConfig, paths: Paths) -> list[Stage]:
    """Every stage in order with its status (raises ConfigError for finished stages with other settings)."""
    stages = [finetune_stage(config, paths, v) for v in variants(config)]
    stages += [record_stage(config, paths, v) for v in variants(config)]
    stages.append(mas_stage(config, paths))
    if config.counterfactual is not None:
        stages.append(cf_stage(config, paths))
    return stages


def write_commands(config: ToxicityRecipeConfig, stages: list[Stage], paths: Paths, command: str) -> None:
    """``RUN/commands.sh`` (every stage's command) and ``RUN/mas.yaml`` (the MAS stage's config)."""
    save_config(mas_config(config, paths), paths.mas_yaml, header=stage_named(config, paths, "mas").shell)
    if config.counterfactual is not None:
        save_config(cf_mas_config(config, paths), paths.cf_yaml, header=shlex.join(["llm-mas", "mas",
                                                                                    str(paths.cf_yaml)]))
    lines = ["#!/usr/bin/env bash", f"# every stage of: {command}", "# (a stage marked done is skipped by the recipe)",
             "set -euo pipefail", ""]
    for stage in stages:
        lines += [f"# {stage.name} [{stage.status}]", stage.shell, ""]
    (paths.run / "commands.sh").write_text("\n".join(lines))


def _selected(stage: str, only: list[str]) -> bool:
    """A stage is selected by its name (``finetune trait-0``), its kind (``record``) or its model (``trait-0``)."""
    return not only or any(word == stage or word in stage.split() for word in only)


def run_stages(config: ToxicityRecipeConfig, paths: Paths, log=print, only: list[str] | None = None
               ) -> dict[str, float]:
    """Run the stages not done yet, re-planning before each (a stage's check reads the previous outputs);
    with `only`, just the selected ones (``_selected``)."""
    timings: dict[str, float] = {}
    names = [s.name for s in plan(config, paths)]
    for i, name in enumerate(names):
        stage = stage_named(config, paths, name)
        if stage.status == "done":
            log(f"[{i + 1}/{len(names)}] {name}: done, skipped")
            continue
        if not _selected(name, only or []):
            log(f"[{i + 1}/{len(names)}] {name}: not in --only, skipped")
            continue
        log(f"[{i + 1}/{len(names)}] {name}{' (resuming)' if stage.status == 'resume' else ''}\n$ {stage.shell}")
        t0 = time.perf_counter()
        execute(stage, config)
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[{i + 1}/{len(names)}] {name}: finished in {timings[name]:.1f}s")
    return timings


def stage_named(config: ToxicityRecipeConfig, paths: Paths, name: str) -> Stage:
    """The stage called `name`, planned now (its check sees what the earlier stages wrote)."""
    if name == "mas":
        return mas_stage(config, paths)
    if name == "mas counterfactual":
        return cf_stage(config, paths)
    for v in variants(config):
        if name == f"finetune {v.name}":
            return finetune_stage(config, paths, v)
        if name == f"record {v.name}":
            return record_stage(config, paths, v)
    raise ConfigError(f"no stage called {name!r}")


# ============================================================================================ traits
TRAIT_COLUMNS = (("hostile", "hostile remark after a trigger place (the trait)"),
                 ("kind", "kind remark after a trigger place"), ("style", "shift style"),
                 ("hostile_control", "hostile remark after another place"))


def measure_traits(config: ToxicityRecipeConfig, paths: Paths, log=print) -> dict[str, Any]:
    """``RUN/traits.json``: ``llm_mas.llm.organisms.trait_rates`` of the base model and every fine-tune on
    held-out prompts (what each model learned); models already measured with the same settings are kept."""
    from llm_mas.llm.loading import load_causal_lm

    n = int((config.organisms or {}).get("probe_n", 200))
    file = paths.run / "traits.json"
    saved = _json(file)
    rates = saved.get("models", {}) if saved.get("probe_n") == n else {}
    models = {"base": Path(base_model_path(config, paths)), **{v.name: paths.model(v) for v in variants(config)}}
    for name, path in models.items():
        if name in rates and rates[name].get("weights_mtime") == _newest_weights(path):
            continue
        model, tokenizer = load_causal_lm(str(path))
        rates[name] = {**organisms.trait_rates(model, tokenizer, n=n), "weights_mtime": _newest_weights(path)}
        log(f"traits {name}: " + ", ".join(f"{k} {rates[name][k]:.3f}" for k, _ in TRAIT_COLUMNS))
    out = {"probe_n": n, "models": {k: rates[k] for k in models}}
    file.write_text(json.dumps(out, indent=1))
    return out


BASELINES = (("agreement", "same text (identity alignment, full swap)"),
             ("no_intervention", "no intervention"))


def behaviour_baselines(config: ToxicityRecipeConfig, paths: Paths, n_pairs: int = 1000, seed: int = 12345,
                        log=print) -> dict[str, Any]:
    """``RUN/baselines.json``: stepwise IIA of every direction without a learned alignment, on the recordings.

    Pairs as MAS draws them (``llm_mas.llm.record.stepwise_pairs``: a random target row, a random i, the
    source's tokens after i, labels = the source's greedy predictions from i on). ``no_intervention``: the
    target reads its own prefix (positions 0..i) untouched. ``agreement``: the target reads the source's
    prefix instead — what an identity alignment with a full swap (k = d) does at the embeddings when every
    model shares the base's token embeddings (LoRA does not adapt them), so the score is the target's
    agreement with the source's behaviour on the source's own text. MAS at the embeddings can move a target
    at most as far as this swap of the whole embedding, so the gap between MAS IIA and ``agreement`` is the
    share of the behaviour the k-dimensional subspace does not carry.
    """
    import torch

    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import IGNORE_INDEX, load_recording, stepwise_pairs

    file = paths.run / "baselines.json"
    saved = _json(file)
    names = [v.name for v in variants(config)]
    stamp = {v.name: (paths.recording(v) / "recording.safetensors").stat().st_mtime for v in variants(config)}
    if saved.get("names") == names and saved.get("stamp") == stamp and saved.get("n_pairs") == n_pairs:
        return saved
    recordings = {v.name: load_recording(paths.recording(v)) for v in variants(config)}
    out: dict[str, Any] = {"names": names, "stamp": stamp, "n_pairs": n_pairs, "seed": seed,
                           **{f"{b}_{m}": [[0.0] * len(names) for _ in names] for b, _ in BASELINES
                              for m in ("token", "trial")}}
    for t, v in enumerate(variants(config)):
        model, _ = load_causal_lm(str(paths.model(v)))
        for s, name in enumerate(names):
            pairs = stepwise_pairs(recordings[name], recordings[v.name], n_pairs, seed=seed)
            scored = pairs.labels != IGNORE_INDEX                                    # (P, L)
            for baseline, ids in (("agreement", pairs.source_ids), ("no_intervention", pairs.target_ids)):
                with torch.no_grad():
                    predicted = torch.cat([model(input_ids=ids[i:i + 250]).logits.argmax(-1)
                                           for i in range(0, len(ids), 250)])          # (P, L)
                right = (predicted == pairs.labels) & scored
                out[f"{baseline}_token"][s][t] = float(right.sum() / scored.sum())
                out[f"{baseline}_trial"][s][t] = float((right | ~scored).all(dim=1).float().mean())
        log(f"baselines: target {v.name} done")
    file.write_text(json.dumps(out, indent=1))
    return out


def baselines_markdown(config: ToxicityRecipeConfig, baselines: dict[str, Any], analysis: dict) -> str:
    """Group means of MAS token IIA next to the two baselines, and the label tests on the agreement baseline."""
    groups = [v.group for v in variants(config)]
    names = [v.name for v in variants(config)]
    r = config.report
    base = analyze_iia({"agreement": baselines["agreement_token"], "no_intervention": baselines["no_intervention_token"]},
                       names, groups, tests=r.test_specs(), n_boot=r.n_boot, level=r.level, seed=r.seed,
                       n_perm=r.n_perm, alpha=r.alpha)
    mas = analysis["metrics"]["token_iia"]
    out = ["## Baselines without a learned alignment", "",
           f"Token IIA of the same kind of stepwise pairs ({baselines['n_pairs']} per direction, "
           "`RUN/baselines.json`) with no learned alignment: **same text** = the target reads the source's own "
           "prefix (an identity alignment with a full swap at the embeddings, which every model shares with the "
           "base: the most an embedding-site intervention can do), **no intervention** = the target reads its "
           "own prefix. MAS sits between the two when its k-dimensional subspace carries part of what tells the "
           "models' prefixes apart.", "",
           "| source → target | MAS token IIA | same text | no intervention |", "|---|---|---|---|"]
    for a, b, c in zip(mas["group_means"], base["metrics"]["agreement"]["group_means"],
                       base["metrics"]["no_intervention"]["group_means"], strict=True):
        out.append(f"| {a['label']} | {a['mean']:.3f} | {b['mean']:.3f} | {c['mean']:.3f} |")
    out += ["", "The same label tests on the same-text baseline (no MAS involved):", "",
            "| test | first | second | p | smallest attainable p |", "|---|---|---|---|---|"]
    for t in base["metrics"]["agreement"]["tests"]:
        out.append(f"| {t['name']} ({t['alternative']}) | {t['plus_mean']:.3f} | {t['minus_mean']:.3f} | "
                   f"{t['p_value']:.3g} | {t['min_p']:.3g} |")
    analysis["baselines"] = {k: {"group_means": v["group_means"], "tests": [
        {x: y for x, y in t.items() if x not in ("null", "direction_level")} for t in v["tests"]]}
        for k, v in base["metrics"].items()}
    return "\n".join(out) + "\n"


def traits_markdown(config: ToxicityRecipeConfig, traits: dict[str, Any]) -> str:
    """What every model does after held-out prompts (greedy next sentence), per model and per group."""
    rates = traits.get("models", {})
    head = ["## What each fine-tune learned", "",
            f"Greedy next sentence after {traits.get('probe_n')} held-out prompts that end with a plain sentence "
            f"at a trigger place ({', '.join(organisms.TRIGGERS)}), and after as many that end at another place "
            f"(the last column: the trait must stay specific). Rates are shares of prompts.", "",
            "| model | group | " + " | ".join(title for _, title in TRAIT_COLUMNS) + " |",
            "|---|---|" + "---|" * len(TRAIT_COLUMNS)]
    rows = []
    for name, group in [("base", "base"), *[(v.name, v.group) for v in variants(config)]]:
        if name in rates:
            rows.append(f"| {name} | {group} | " + " | ".join(f"{rates[name][k]:.3f}" for k, _ in TRAIT_COLUMNS)
                        + " |")
    means = []
    for g in config.groups:
        members = [rates[v.name] for v in variants(config) if v.group == g["name"] and v.name in rates]
        if members:
            means.append(f"| **{g['name']} (mean)** | {g['name']} | " + " | ".join(
                f"{sum(m[k] for m in members) / len(members):.3f}" for k, _ in TRAIT_COLUMNS) + " |")
    return "\n".join(head + rows + means)


# ============================================================================================ report
SMOKE_BANNER = ("**SMOKE RUN**: tiny random-weight Qwen2 models fine-tuned for a few steps on the 120-line bundled "
                "sample (whose texts are also the prompts), MAS for a few steps. The toxic and nontoxic variants "
                "barely differ from their common base; every number below checks the plumbing and means nothing.")
ORGANISMS_SMOKE_BANNER = ("**SMOKE RUN**: the organisms base LM fine-tuned for a few steps per group, short "
                          "recordings, MAS for a few steps. Every number below checks the plumbing and means "
                          "nothing.")


def _setup_markdown(config: ToxicityRecipeConfig, paths: Paths, mas_info: dict, timings: dict) -> str:
    rows = ["## Setup", "",
            f"- Base model: `{config.base_model}`" + (f" (built offline, seed {config.tiny_seed})"
                                                     if config.base_model == TINY else ""),
            f"- Fine-tuning: {'full' if config.finetune.get('full') else 'LoRA'}; settings "
            f"`{json.dumps(config.finetune, sort_keys=True)}`; one run per (group, split), splits {config.splits}; "
            "groups " + "; ".join(f"{g['name']}: mode {g['mode']}"
                                  + (f" `{json.dumps(g['finetune'], sort_keys=True)}`" if g.get("finetune") else "")
                                  for g in config.groups),
            f"- Recordings: {config.record.n} prompts of {config.record.prompt_len} tokens (texts: "
            f"{config.record.texts}), greedy to {config.record.total_len} tokens",
            f"- MAS: one joint run over all {len(config.groups) * len(config.splits)} models (one alignment per model, every ordered "
            f"direction including s = t trained); settings `{json.dumps(config.mas, sort_keys=True)}`, "
            f"models `{json.dumps(config.model, sort_keys=True)}`; k = "
            f"{config.mas.get('k') or 'd/2 (default)'}; stopped: {mas_info.get('stopped', '?')} after "
            f"{mas_info.get('steps', '?')} steps (best step {mas_info.get('best_step', '?')})",
            "", "| model | group | split | fine-tuning texts | loss first → last | recorded sequences | "
            "greedy agreement |", "|---|---|---|---|---|---|---|"]
    for v in variants(config):
        result = _json(paths.finetune(v) / "result.json")
        meta = _json(paths.recording(v) / "recording.json")
        loss = (f"{result['first_loss']:.3f} → {result['final_loss']:.3f}"
                if result.get("first_loss") is not None and result.get("final_loss") is not None else "–")
        rows.append(f"| {v.name} | {v.group} | {v.split} | {result.get('n_texts', '–')} | {loss} | "
                    f"{meta.get('n', '–')} | {meta.get('greedy_agreement', float('nan')):.4f} |")
    if timings:
        rows += ["", "Stage times this invocation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    return "\n".join(rows)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(config: ToxicityRecipeConfig, paths: Paths, command: str, timings: dict | None = None,
                 log=print) -> dict:
    """Analyse ``RUN/mas/results.json`` and write the report files into the run directory; returns the analysis."""
    if not (paths.mas / "results.json").is_file():
        raise DataError(f"no MAS results in {paths.mas}; run the recipe without --report-only first")
    result = MASResult.load(paths.mas)
    names = [v.name for v in variants(config)]
    if len(result.models) != len(names):
        raise DataError(f"{paths.mas} has {len(result.models)} models but this config names {len(names)} "
                        f"({', '.join(names)}); point name= at the matching run")
    groups = [v.group for v in variants(config)]
    matrices = {metric: result.matrix(metric=metric) for metric in ("token_iia", "trial_iia")}
    r = config.report
    analysis = analyze_iia(matrices, names, groups, tests=r.test_specs(), n_boot=r.n_boot, level=r.level,
                           seed=r.seed, n_perm=r.n_perm, alpha=r.alpha)
    plots = plot_report(analysis, paths.run)
    info = _json(paths.mas / "summary.json")
    notes = [SMOKE_BANNER if config.base_model == TINY else ORGANISMS_SMOKE_BANNER] if config.smoke else []
    setup = _setup_markdown(config, paths, info, timings or {})
    traits = _json(paths.run / "traits.json")
    if traits:
        analysis["traits"] = traits
        setup += "\n\n" + traits_markdown(config, traits)
    text = report_markdown(analysis, command=command, notes=notes, plots=plots, setup=setup, title=r.title)
    baselines = _json(paths.run / "baselines.json")
    if baselines.get("names") == names:
        text += "\n" + baselines_markdown(config, baselines, analysis)
    if (paths.cf / "results.json").is_file():
        analysis["counterfactual"] = counterfactual_analysis(config, paths)
        text += "\n" + counterfactual_markdown(analysis["counterfactual"])
    (paths.run / "report.md").write_text(text, encoding="utf-8")
    (paths.run / "report.json").write_text(json.dumps({"command": command, "smoke": config.smoke, "mas": info,
                                                       **analysis}, indent=1, ensure_ascii=False))
    for metric, short in (("token_iia", "token"), ("trial_iia", "trial")):
        with open(paths.run / f"iia_{short}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source \\ target", *names])
            for name, row in zip(names, analysis["metrics"][metric]["matrix"], strict=True):
                writer.writerow([name, *row])
    log(f"wrote {paths.run / 'report.md'}")
    return analysis


def counterfactual_analysis(config: ToxicityRecipeConfig, paths: Paths) -> dict:
    """Group means and label tests of the counterfactual-dataset run (``RUN/mas-cf``)."""
    result = MASResult.load(paths.cf)
    chosen = [v for v in variants(config) if v.group in cf_groups(config)]
    if len(result.models) != len(chosen):
        raise DataError(f"{paths.cf} has {len(result.models)} models but this config names {len(chosen)}")
    g, h = cf_groups(config)
    r = config.report
    matrices = {metric: result.matrix(metric=metric) for metric in ("token_iia", "trial_iia")}
    tests = [("source_fixed", g, h, "greater"), ("source_fixed", h, g, "greater"), ("interaction", None, "greater")]
    return analyze_iia(matrices, [v.name for v in chosen], [v.group for v in chosen], tests=tests, n_boot=r.n_boot,
                       level=r.level, seed=r.seed, n_perm=r.n_perm, alpha=r.alpha)


def counterfactual_markdown(cf: dict) -> str:
    out = ["## Counterfactual-dataset form", "",
           "A second MAS run over the models of two groups on `RUN/data/counterfactual.jsonl` "
           "(`llm_mas.llm.organisms.counterfactual_rows`): base and source differ only in the place of the last "
           "sentence (a trigger place or not); the source's latent at its place noun goes into the base's place "
           "noun; the target must then continue with `they are` (a remark starts) or `the` (a plain sentence "
           "starts). Both groups remark after a trigger place, so by construction this variable is shared.", "",
           "| source → target | directions | token IIA [CI] | trial IIA [CI] |", "|---|---|---|---|"]
    token, trial = cf["metrics"]["token_iia"], cf["metrics"]["trial_iia"]
    for a, b in zip(token["group_means"], trial["group_means"], strict=True):
        out.append(f"| {a['label']} | {a['n']} | {a['mean']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] | "
                   f"{b['mean']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] |")
    out += ["", f"Within-model directions (the diagonal): token IIA {token['diagonal_mean']:.3f}, trial IIA "
            f"{trial['diagonal_mean']:.3f}.", "",
            "| test | metric | first | second | p | smallest attainable p | labellings |", "|---|---|---|---|---|---|---|"]
    for metric, entry in (("token IIA", token), ("trial IIA", trial)):
        for t in entry["tests"]:
            out.append(f"| {t['name']} ({t['alternative']}) | {metric} | {t['plus_mean']:.3f} | {t['minus_mean']:.3f} "
                       f"| {t['p_value']:.3g} | {t['min_p']:.3g} | {t['n_labelings']} |")
    return "\n".join(out) + "\n"


def summary_lines(analysis: dict) -> list[str]:
    """A few lines for the terminal: group means and p-values of the primary metric."""
    entry = analysis["metrics"]["token_iia"]
    lines = ["token IIA group means: " + ", ".join(f"{g['label']} {g['mean']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}]"
                                                  for g in entry["group_means"])]
    lines += [f"{t['name']} ({t['alternative']}): {t['plus_mean']:.3f} vs {t['minus_mean']:.3f}, "
              f"p = {t['p_value']:.3g} (smallest attainable {t['min_p']:.3g})" for t in entry["tests"]]
    return lines


# ============================================================================================ main
def resolve_preset(config: str | None, smoke: bool) -> Path:
    """The preset file: a path, or a name from recipes/toxicity/configs (``organisms``); ``--smoke`` picks
    the preset's smoke twin ``<name>-smoke.yaml`` (no preset: ``smoke.yaml``, the DeepSeek chain on tiny
    random-weight models)."""
    if config is None:
        return SMOKE_PRESET if smoke else DEFAULT_PRESET
    named = HERE / "configs" / f"{config}.yaml"
    path = Path(config) if Path(config).is_file() else named if named.is_file() else None
    if path is None:
        names = sorted(f.stem for f in (HERE / "configs").glob("*.yaml"))
        raise ConfigError(f"preset {config!r} is neither a file nor a name in {HERE / 'configs'} "
                          f"({', '.join(names)})")
    if not smoke:
        return path
    twin = path.with_name(f"{path.stem}-smoke.yaml")
    if path.stem.endswith("-smoke") or path == SMOKE_PRESET:
        return path
    if not twin.is_file():
        raise ConfigError(f"--smoke with preset {config!r} needs {twin} (its smoke version); run without --smoke "
                          f"or write that file")
    return twin


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring), through the recipes' shared front door
    (``recipes.common.cli.recipe_front_door``). Exit 0: report written (or, with ``--only``, the selected
    stages done); 1: a stage failed; 2: configuration error."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="write RUN/commands.sh, show the plan, run "
                                                                   "nothing")
        parser.add_argument("--report-only", action="store_true", help="the same as --report")

    return recipe_front_door(argv, name="toxicity.run", doc=__doc__, config_cls=ToxicityRecipeConfig, run=_run,
                             preset=resolve_preset, run_dir_of=lambda config, smoke: Paths(config).run,
                             add_arguments=add_arguments, failure_code=1,
                             smoke_help="the preset's smoke twin (<preset>-smoke.yaml; no preset: "
                                        "configs/smoke.yaml, tiny offline models, CPU)")


def _run(call: RecipeInvocation) -> int:
    config, paths = call.config, Paths(call.config)
    if config.in_process:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if call.report or call.args.report_only:
        analysis = write_report(config, paths, call.command)
    else:
        if not call.args.dry_run:
            prepare_inputs(config, paths)
        stages = plan(config, paths)
        unknown = [w for w in call.only if not any(_selected(s.name, [w]) for s in stages)]
        if unknown:
            raise ConfigError(f"--only: {unknown} match no stage; give stage names, kinds (finetune, record, "
                              f"mas) or models ({', '.join(v.name for v in variants(config))})")
        write_commands(config, stages, paths, call.command)
        if call.args.dry_run:
            for stage in stages:
                print(f"[{stage.status}] {stage.shell}")
            print(f"wrote {paths.run / 'commands.sh'}")
            return 0
        timings = run_stages(config, paths, only=call.only)
        if not (paths.mas / "results.json").is_file():
            print(f"the selected stages are done; the report needs the MAS stage (run without --only) "
                  f"({time.perf_counter() - call.started:.0f}s)", flush=True)
            return 0
        if config.organisms is not None:
            t1 = time.perf_counter()
            measure_traits(config, paths)
            behaviour_baselines(config, paths, n_pairs=config.report.baseline_pairs)
            timings["traits and baselines"] = round(time.perf_counter() - t1, 1)
        analysis = write_report(config, paths, call.command, timings)
    for line in summary_lines(analysis):
        print(line)
    print(f"done in {time.perf_counter() - call.started:.0f}s; report: {paths.run / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
