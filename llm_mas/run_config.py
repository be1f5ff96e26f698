"""The run config of MAS (`MASConfig`): a list of models, the variables and directions, data, training and
evaluation settings. YAML presets hold it; ``load_mas_config`` adds ``key.sub=value`` overrides and reports
every problem at once (one ``ConfigError``) before anything heavy loads.

    cfg = load_mas_config(resolve_preset("gru_gru_hidden"), ["train.lr=2e-3", "data.n_train=2000"])

A model entry is one of the registered model kinds (`llm_mas.problems.kinds`), told apart by ``kind`` (a
key another kind has but this one does not is an error): ``task`` (`TaskModelConfig`, the default: a
shipped or trained task model), ``hf`` (`HFModelConfig`: a Hugging Face causal LM with its recording),
``module`` (`ModuleModelConfig`: any torch module, by factory and weights file) or a kind a user
registered. ``llm_mas.run.run`` runs a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .alignments import ALIGNMENTS, make_alignment
from .config import apply_overrides, from_dict, load_yaml
from .errors import ConfigError, DataError, MASError
from .models.registry import resolve_model_dir
from .models.training import read_run_config
from .problems.kinds import (
    KINDS,
    MODEL_CONFIG,
    GenericModelConfig,  # noqa: F401  (re-exported)
    HFModelConfig,
    ModelConfigBase,
    ModuleModelConfig,
    TaskModelConfig,
)
from .problems.llm import (
    SITE_CACHE_BYTES,
    SITE_DISK_BYTES,
    hf_header_problems,  # noqa: F401  (re-exported: the hf kind's check)
    site_cache_dir_problems,
)
from .problems.task import task_model_header_problems, task_model_infos  # noqa: F401  (the task kind's check)
from .trainer import TrainerConfig

# the model entries' schemas are registry entries (`llm_mas.problems.kinds`); re-exported here
ModelConfig = TaskModelConfig | HFModelConfig | ModuleModelConfig


@dataclass
class DataConfig:
    n_train: int = 10_000               # intervention pairs per direction and variable
    n_valid: int = 1_000
    stepwise: bool = False              # stepwise (positions 0..i) instead of indywise (one position)
    # [lo, hi]: swap only where the swapped variable's value lies in lo..hi in both the source and the
    # target (named variables only; e.g. Arithmetic cumulative_value restricted to 1..10)
    value_range: list[int] | None = None
    # a counterfactual run (llm_mas.problems.counterfactual): a JSONL/CSV dataset of (base, source, positions,
    # continuation) rows for HF models, or a built-in task (e.g. multiobject, binding) rendered as text for HF
    # models and read as ids by task models (kinds may be mixed); or a directory of counterfactual tensors
    # (CounterfactualTensors.save: data.safetensors + data.json) for models of any kind
    dataset: str | None = None
    task: str | None = None
    # a counterfactual run refuses text (dataset rows or a task rendered as text) that an HF model's tokenizer
    # reads as its unknown token, naming the model, the word and the rows; true: run anyway (the words are
    # listed in the log)
    allow_unknown_tokens: bool = False
    # Python only: the CounterfactualTensors object itself (compare(data=...)); digested into the fingerprint
    tensors: Any = field(default=None, metadata={"runtime": True})

    def validate(self) -> list[str]:
        p = []
        if self.n_train < 1:
            p.append(f"data.n_train must be >= 1, got {self.n_train}")
        if self.n_valid < 1:
            p.append(f"data.n_valid must be >= 1, got {self.n_valid}")
        if self.tensors is not None:
            from .tasks.tensor_data import CounterfactualTensors

            if not isinstance(self.tensors, CounterfactualTensors):
                p.append(f"data.tensors: expected llm_mas.CounterfactualTensors (Python only), got "
                         f"{type(self.tensors).__name__}; in a config file set data.dataset to a directory written "
                         "by CounterfactualTensors.save")
            if self.dataset is not None or self.task is not None:
                p.append("data: give counterfactual tensors or data.dataset / data.task, not both")
        if self.value_range is not None:
            vr = self.value_range
            if not isinstance(vr, (list, tuple)) or len(vr) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in vr):
                p.append(f"data.value_range must be two integers [lo, hi], got {vr!r}")
            elif vr[0] > vr[1]:
                p.append(f"data.value_range {list(vr)} is empty: need lo <= hi, e.g. [{vr[1]}, {vr[0]}]")
        return p


@dataclass
class CLConfig:
    """CLMAS: models whose behaviour under intervention may not be used (causally inaccessible).

    Directions *into* them are trained only by the counterfactual-latent loss, the others by behaviour;
    total = (1 − epsilon)·L_behaviour + epsilon·L_CL. Every direction is still evaluated behaviourally.
    match_on: the target-task state variables a counterfactual latent is matched on (default: every state
    variable of the intended state, e.g. obj_count, phase and count for MultiObject). Matching on fewer (e.g.
    [phase, count], what the rest of the sequence depends on) finds a natural latent for intended states
    that never occur naturally (a count above the target's own obj_count) at the price of noise in the
    variables left out.
    """

    inaccessible: list[int] = field(default_factory=list)
    epsilon: float = 0.0
    match_on: list[str] | None = None

    def validate(self) -> list[str]:
        p = [] if 0.0 <= self.epsilon <= 1.0 else [f"cl.epsilon must be in [0, 1], got {self.epsilon}"]
        if self.match_on is not None and not self.match_on:
            p.append("cl.match_on: list at least one state variable, or leave it unset (null) to match on all")
        return p


@dataclass
class EvalConfig:
    batch_size: int = 1000

    def validate(self) -> list[str]:
        return [] if self.batch_size >= 1 else [f"eval.batch_size must be >= 1, got {self.batch_size}"]


@dataclass
class SiteCacheConfig:
    """Where stepwise LLM MAS keeps the targets' layer-l outputs when steps start at the site
    (``models.i.skip_below_site``, docs/method.md §14.3); how fast a step is, not what it computes (not part
    of the run's fingerprint).

    Each pair's output is computed once; the first pairs (train, then valid) are kept in memory on their
    target's device up to ``memory_mib`` in all, the next ones in files up to ``disk_mib`` in all, and the
    rest are recomputed (layers 0..l) at every read. Disk is off by default: how much a run would write
    (L × d × bytes per value per pair and direction: 7.3 GiB for 10 000 pairs × 4 directions at d = 1536,
    L = 64 in bf16) and where it may go (a /tmp in memory would only move the memory) are the user's call.
    ``dir``: the files go in a fresh ``llm_mas-site-cache-*`` directory under it (unset: the system's
    temporary directory), removed when the run's problem goes or the process exits.
    """

    memory_mib: float = SITE_CACHE_BYTES / 2**20
    disk_mib: float = SITE_DISK_BYTES / 2**20
    dir: str | None = None

    def validate(self) -> list[str]:
        p = [f"site_cache.{key} must be >= 0 (MiB), got {value}" for key, value in
             (("memory_mib", self.memory_mib), ("disk_mib", self.disk_mib)) if value < 0]
        if self.dir is not None:
            if self.disk_mib == 0:
                p.append(f"site_cache.dir is {self.dir!r} but site_cache.disk_mib is 0 (nothing goes to disk); set "
                         "site_cache.disk_mib (e.g. 4096) or remove site_cache.dir")
            p.extend(f"site_cache.dir: {problem}" for problem in site_cache_dir_problems(self.dir))
        return p


@dataclass
class MASConfig:
    models: list[MODEL_CONFIG]
    name: str = "mas"
    seed: int = 0
    variables: list[str] = field(default_factory=lambda: ["full"])
    k: int | None = None                # coordinates per variable (default: half the smallest width)
    null_subspace: bool = False         # train the remaining coordinates to change nothing (s == t only)
    directions: str | list[list[int]] = "all"   # all | cross | self | [[s, t], ...] (trained; all are evaluated)
    intervention: Literal["interchange", "stitch", "linear_stitch"] = "interchange"
    # interchange: MAS/DAS; stitch: rank-k partial isometry h_s Q_s P_k Q_tᵀ (target latent discarded);
    # linear_stitch: one unconstrained affine map of rank <= k per trained direction
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cl: CLConfig = field(default_factory=CLConfig)
    site_cache: SiteCacheConfig = field(default_factory=SiteCacheConfig)   # stepwise LLM MAS only
    out_dir: str = "runs"
    device: str = "cpu"
    progress: bool = True
    resume: bool = True
    # modules imported before the models are read (``package.module``, the user's own code): they register
    # model kinds (llm_mas.register_kind / register_problem) that this config's models then name
    plugins: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """The kind of problem the run builds: ``tensors`` (counterfactual tensors: data.tensors, or data.dataset
        a tensor directory), ``counterfactual`` (data.dataset a text file, or data.task), else the models' kind."""
        from .tasks.tensor_data import is_tensor_dataset

        if self.data.tensors is not None or (self.data.dataset is not None and is_tensor_dataset(self.data.dataset)):
            return "tensors"
        if self.data.dataset is not None or self.data.task is not None:
            return "counterfactual"
        kinds = [m.kind for m in self.models if isinstance(m, ModelConfigBase)]
        return kinds[0] if kinds else "task"

    def validate(self) -> list[str]:
        p = []
        if not isinstance(self.name, str) or not self.name or self.name.startswith(".") or any(
                c in self.name for c in "/\\") or ".." in self.name:
            p.append(f"name: {self.name!r} must be a plain directory name (not empty, no '/', '\\' or '..', not "
                     "starting with '.'); the run directory is out_dir/name, e.g. name: gru-vs-lstm")
        if not self.models:
            p.append("models: list at least one model (shipped names: see `llm-mas list-models`)")
        built = [m for m in self.models if isinstance(m, ModelConfigBase)]  # entries with problems are reported
        kinds = sorted({m.kind for m in built})
        if self.kind == "tensors":
            p.extend(self._tensor_problems())
        elif self.kind == "counterfactual":
            from .problems.counterfactual import counterfactual_problems

            p.extend(counterfactual_problems(self))
            for i, m in enumerate(self.models):
                if isinstance(m, HFModelConfig):
                    p.extend(m.problems(f"models.{i}", needs_recording=False))
        elif len(kinds) > 1:
            p.append(f"models: mixing kinds {' and '.join(map(repr, kinds))} in one run is supported only by "
                     "counterfactual runs (set data.task or data.dataset)")
        elif kinds == ["hf"]:
            p.extend(self._hf_problems())
        elif kinds == ["module"]:
            p.append("models: module models run on counterfactual tensors: set data.dataset to a directory "
                     "written by CounterfactualTensors.save (or pass data=CounterfactualTensors to compare)")
        elif kinds and KINDS[kinds[0]].build is None:
            p.append(f"models: kind {kinds[0]!r} has no problem of its own; set data.dataset (counterfactual tensors)")
        if self.site_cache != SiteCacheConfig() and self.kind != "hf":
            p.append(f"site_cache: set, but only stepwise LLM MAS runs (kind: hf models, no data.dataset / "
                     f"data.task) have a site cache; this is a {self.kind} run: remove site_cache")
        for i, m in enumerate(self.models):
            if not isinstance(m, ModelConfigBase):
                continue
            if not isinstance(m, (HFModelConfig, TaskModelConfig)):
                p.extend(m.problems(f"models.{i}"))
            if m.alignment_init is not None:
                p.extend(self._init_problems(i, m))
            if m.alignment not in ALIGNMENTS:
                p.append(f"models.{i}.alignment: unknown kind {m.alignment!r}; valid: {', '.join(sorted(ALIGNMENTS))}")
            elif m.alignment_options:
                try:  # a tiny instance checks option names and values before any model loads
                    make_alignment(m.alignment, 8, k=4, seed=0, **m.alignment_options)
                except (MASError, TypeError, ValueError) as e:
                    p.append(f"models.{i}.alignment_options: {e}")
        if isinstance(self.directions, str):
            if self.directions not in ("all", "cross", "self"):
                p.append(f"directions: {self.directions!r} must be all, cross, self or a list of [source, target]")
            elif self.directions == "cross" and len(self.models) < 2:
                p.append(f"directions: 'cross' trains between different models but only {len(self.models)} "
                         "model is listed; list a second model or use directions: self")
        else:
            for d in self.directions:
                if len(d) != 2 or not all(0 <= x < len(self.models) for x in d):
                    p.append(f"directions: {d} must be [source, target] with indices in 0..{len(self.models) - 1}")
        for i in self.cl.inaccessible:
            if not 0 <= i < len(self.models):
                p.append(f"cl.inaccessible: model index {i} is outside 0..{len(self.models) - 1}")
        if self.k is not None and self.k < 1:
            p.append(f"k must be >= 1, got {self.k}")
        if not self.variables:
            p.append("variables: list at least one variable (e.g. full, count, phase)")
        if self.data.value_range is not None:
            whole = [v for v in self.variables if v in ("full", "null")] + (["null"] if self.null_subspace else [])
            if whole:
                p.append(f"data.value_range restricts one named variable's values; it cannot apply to "
                         f"{sorted(set(whole))}: list named variables only (e.g. variables: [count]) and set "
                         "null_subspace: false")
        if self.null_subspace:
            stacked = [f"models.{i}" for i, m in enumerate(built)
                       if m.alignment in ALIGNMENTS and ALIGNMENTS[m.alignment].rank_k]
            if stacked:
                p.append(f"null_subspace: {', '.join(stacked)} use a low_rank/gram_schmidt alignment, whose aligned "
                         "width is k·(number of variables): it has no coordinates left for the null block; use "
                         "alignment: orthogonal for null_subspace: true, or set null_subspace: false")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            p.append(f"device {self.device!r} must be cpu or cuda[:i]")
        return p

    def _init_problems(self, i: int, m: ModelConfigBase) -> list[str]:
        from .problems.manifest import alignment_init_problems

        where = f"models.{i}"
        if self.intervention == "linear_stitch":
            return [f"{where}.alignment_init: a linear_stitch run trains one map per direction, not per model's "
                    "alignment; remove alignment_init or use intervention: interchange / stitch"]
        p, entry = alignment_init_problems(m.alignment_init, m.name, m.alignment, m.standardize,
                                           m.alignment_options, where)
        if entry is not None:
            if self.k is not None and entry["run_k"] not in (None, self.k):
                p.append(f"{where}.alignment_init: {m.alignment_init!r} was trained with k={entry['run_k']}, this "
                         f"run has k={self.k}; set k: {entry['run_k']} or start from a run with k={self.k}")
            if entry["run_variables"] is not None and list(entry["run_variables"]) != list(self.variables):
                p.append(f"{where}.alignment_init: {m.alignment_init!r} aligned variables {entry['run_variables']}, "
                         f"this run {list(self.variables)}; they must be the same")
        return p

    def _tensor_problems(self) -> list[str]:
        p = []
        if self.null_subspace:
            p.append("null_subspace: not implemented for tensor runs; set null_subspace: false")
        if self.intervention not in ("interchange", "stitch"):
            p.append(f"intervention: {self.intervention!r} is not available for tensor runs; use interchange or "
                     "stitch")
        if self.data.stepwise:
            p.append("data.stepwise: a tensor dataset names its intervened positions per row (positions (N, P)); "
                     "set data.stepwise: false")
        if self.data.value_range is not None:
            p.append("data.value_range applies to built-in tasks only; filter the tensor rows instead")
        for i, m in enumerate(self.models):
            if isinstance(m, HFModelConfig):
                p.extend(m.problems(f"models.{i}", needs_recording=False))
                if m.recording is not None:
                    p.append(f"models.{i}.recording: a tensor run reads its data, not a recording; remove it")
            elif isinstance(m, ModelConfigBase) and KINDS.get(m.kind) is not None and KINDS[m.kind].load is None:
                p.append(f"models.{i}: kind {m.kind!r} cannot run on counterfactual tensors (no loader registered)")
        return p

    def _hf_problems(self) -> list[str]:
        p = []
        if list(self.variables) != ["full"]:
            p.append(f"variables: LLM MAS has one variable, 'full' (the model's behaviour); got {self.variables}")
        if self.null_subspace:
            p.append("null_subspace: not implemented for LLM MAS; set null_subspace: false")
        if not self.data.stepwise:
            p.append("data.stepwise: LLM MAS is stepwise (positions 0..i receive the source's subspace); "
                     "set data.stepwise: true")
        for i, m in enumerate(self.models):
            if isinstance(m, HFModelConfig):
                p.extend(m.problems(f"models.{i}"))
        return p

    def _directions(self) -> list[tuple[int, int]]:
        n = len(self.models)
        if self.directions == "all":
            return [(s, t) for s in range(n) for t in range(n)]
        if self.directions == "cross":
            return [(s, t) for s in range(n) for t in range(n) if s != t]
        if self.directions == "self":
            return [(i, i) for i in range(n)]
        return [tuple(d) for d in self.directions]

    def train_directions(self) -> list[tuple[int, int]]:
        """Directions trained by behaviour (those into an inaccessible model are CL-trained instead)."""
        return [d for d in self._directions() if d[1] not in self.cl.inaccessible]

    def cl_directions(self) -> list[tuple[int, int]]:
        return [d for d in self._directions() if d[1] in self.cl.inaccessible]


def check_models(config: MASConfig) -> list:
    """Manifest entries of the task models (None for other models); raises ConfigError for unknown task-model
    names and variables their tasks do not have (no weights are loaded)."""
    if config.kind != "task":
        return [None] * len(config.models)
    problems, infos = task_model_infos(config)
    if problems:
        raise ConfigError(problems)
    return infos


def load_mas_config(path: str | Path | None, overrides=(), base: dict | None = None) -> MASConfig:
    """Preset + overrides -> MASConfig. Every problem — unknown keys, bad values, unknown model names,
    variables a model's task does not have — is reported in one ConfigError, before anything loads."""
    data = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    data = apply_overrides(data, overrides)
    problems: list[str] = import_plugins(data.get("plugins"))
    try:
        cfg = from_dict(MASConfig, data)
    except ConfigError as e:
        problems.extend(e.problems)
        cfg = None
    data_problems: list[str] = []
    if cfg is not None:
        if cfg.kind == "task":  # the task kind's check (preflight runs every kind's)
            found, data_problems = KINDS["task"].check(cfg)
            problems.extend(found)
    else:  # the config did not build: still check the task-model names (and variables) it gives
        problems.extend(_raw_model_problems(data))
    if problems:
        raise ConfigError(problems + data_problems)
    if data_problems:
        raise DataError(data_problems[0] if len(data_problems) == 1 else "\n".join(data_problems))
    return cfg


def import_plugins(plugins: Any) -> list[str]:
    """Import a config's ``plugins`` (modules that register model kinds); the problems of those that do not
    import (each named, with its error)."""
    import importlib

    if plugins is None:
        return []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        return [f"plugins: expected a list of module names (package.module), got {plugins!r}"]
    problems = []
    for name in plugins:
        try:
            importlib.import_module(name)
        except Exception as e:  # the user's code: whatever it raises on import is reported
            problems.append(f"plugins: {name!r} does not import ({type(e).__name__}: {e}); check the name and "
                            "that its package is on PYTHONPATH (or installed)")
    return problems


def _raw_model_problems(data: dict) -> list[str]:
    """Unknown task-model names and variables their tasks lack, from a config that did not build."""
    from .tasks import get_task

    problems = []
    variables = data.get("variables", ["full"])
    for i, m in enumerate(data.get("models") or []):
        if not (isinstance(m, dict) and m.get("kind", "task") == "task" and isinstance(m.get("name"), str)):
            continue
        try:
            run_dir, entry = resolve_model_dir(m["name"])
        except ConfigError as e:
            problems.append(f"models.{i}.name: {e}")
            continue
        try:
            task = get_task((entry or {}).get("task") or read_run_config(run_dir)["train"]["task"])
        except (MASError, KeyError, TypeError):
            continue
        site = m.get("site", "hidden")
        if isinstance(site, str):
            try:  # the architecture from config.yaml (no weights): does the site exist?
                from .backends.torch_hooks import get_module
                from .models.task_models import build_from_settings
                from .sites import resolve_site

                model = build_from_settings(read_run_config(run_dir)["model"])
                get_module(model, resolve_site(model, site))
            except MASError as e:
                if not isinstance(e, DataError):
                    problems.append(f"models.{i}.site: {e}")
            except (KeyError, TypeError):
                pass
        variable_map = m.get("variable_map") if isinstance(m.get("variable_map"), dict) else {}
        for v in variables if isinstance(variables, list) else []:
            own = variable_map.get(v, v)
            if isinstance(own, str) and own not in ("full", "null", *task.variables):
                problems.append(f"variables: {own!r} is not a variable of task {task.name!r} (models.{i}); valid: "
                                f"full, {', '.join(task.variables)}")
    return list(dict.fromkeys(problems))


def device_problems(config: MASConfig) -> list[str]:
    """Devices of the config (the run's and each HF model's) that this machine does not have."""
    import torch

    wanted = [("device", config.device)] + [(f"models.{i}.device", m.device) for i, m in enumerate(config.models)
                                            if isinstance(m, HFModelConfig) and m.device is not None]
    problems = []
    for where, device in wanted:
        if not isinstance(device, str) or not device.startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            problems.append(f"{where}: {device!r} requested but CUDA is not available here; use {where}=cpu")
            continue
        index = device.split(":", 1)[1] if ":" in device else "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            problems.append(f"{where}: {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return problems


def preflight(config: MASConfig) -> None:
    """Everything a run can check before it touches its run directory or loads weights, in one pass and one
    error: the config's own validation, then each model kind's check once (``ModelKind.check``: task models'
    names, variables, sites, k and weight-file headers; HF recordings and widths; module factories, weights
    and sites; a registered kind's own), the counterfactual tensors and the devices. ConfigError for config
    problems, DataError when only files are at fault."""
    problems = config.validate()
    data_problems: list[str] = []
    if not problems:
        for name in dict.fromkeys(m.kind for m in config.models):
            check = KINDS[name].check if name in KINDS else None
            if check is not None:
                found, data_found = check(config)
                problems.extend(found)
                data_problems.extend(data_found)
        if config.kind == "tensors" and not problems:
            found, data_problems = tensor_problems(config)
            problems.extend(found)
    problems = problems + device_problems(config)
    if problems:
        raise ConfigError(problems + data_problems)
    if data_problems:
        raise DataError(data_problems[0] if len(data_problems) == 1 else "\n".join(data_problems))


def tensor_problems(config: MASConfig) -> tuple[list[str], list[str]]:
    """(config problems, data problems) of a run on counterfactual tensors: task-model names resolve, the
    variable is the dataset's, and the tensors are valid for this many models (every row problem at once)."""
    from .problems.kinds import tensor_dataset

    problems: list[str] = []
    for i, m in enumerate(config.models):
        if isinstance(m, TaskModelConfig):
            try:
                resolve_model_dir(m.name)
            except ConfigError as e:
                problems.append(f"models.{i}.name: {e}")
    try:
        data = tensor_dataset(config)
    except MASError as e:
        return problems, [f"data.dataset: {e}"]
    if list(config.variables) != [data.variable]:
        problems.append(f"variables: counterfactual tensors have one variable, {data.variable!r} (their `variable`); "
                        f"got {config.variables}")
    found = data.problems(len(config.models))
    return problems, ([f"{len(found)} problems in the counterfactual tensors:"] if len(found) > 1 else []) + found


def config_from_kwargs(**kwargs) -> MASConfig:
    """`MASConfig` from keyword arguments (validated like a preset)."""
    return from_dict(MASConfig, kwargs)
