"""Model kinds as registry entries: a kind is its config schema, its checks, its loaders and its digests.

    register_kind(ModelKind("neurogym", schema=NeurogymModelConfig, build=build_neurogym_problem))

A run config's ``models.i.kind`` names a registered kind; ``load_mas_config`` / ``from_dict`` build each
entry with the kind's schema (a dataclass; unknown keys and bad values are reported like any other), the
runner asks the kind for

- ``build(config, *, shard, log)``: the problem of a run whose models are all of this kind (no tensor
  dataset; e.g. ``task``: the task models on their own task, ``hf``: LMs on their recordings);
- ``load(entry, index, device, log) -> LoadedModel``: one model, its backend and site, for a run on
  counterfactual tensors (``data.dataset`` a tensor directory, or ``compare(data=CounterfactualTensors)``),
  where kinds mix freely;
- ``check(config) -> (problems, data problems)``: what is wrong with the config's entries of this kind,
  found without loading weights (``preflight`` runs it once per kind present, before the run directory is
  touched; config problems and problems of files apart);
- ``fingerprint(entry) -> {name: digest}``: what its result depends on beyond the config (weights files).

Built-in kinds: ``task`` (shipped / trained task models), ``hf`` (Hugging Face causal LMs), ``module``
(any ``torch.nn.Module``: a factory import path and a weights file, or the object itself in Python),
``recorded`` (recorded latents and causal states, `llm_mas.RecordedSystem`: causally inaccessible).
``register_problem(kind, builder)`` registers a kind with the generic schema (`GenericModelConfig`: the
common keys and ``options``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError, MASError
from ..models.modules import build_module, read_weights, state_digest
from ..sites import Site

ProblemBuilder = Callable[..., Any]


# ------------------------------------------------------------------------------------------ schemas
@dataclass
class ModelConfigBase:
    """What every model entry has: which model, where its latent is, and its alignment."""

    name: str                           # task: shipped name (llm-mas list-models) or checkpoint directory;
                                        # hf: hub id or local directory; module: a display name
    site: str = "hidden"                # an alias ("hidden", "embeddings", "layer{l}") or a module/hook path
    alignment: str = "orthogonal"       # orthogonal | low_rank | gram_schmidt | linear | identity
    # kind-specific options: orthogonal_map (matrix_exp | cayley | householder; cayley's materialize +
    # backward is 11.7x cheaper at d = 1024, bench/alignment_cost.py), method (gram_schmidt: qr | cgs2),
    # bias (linear)
    alignment_options: dict[str, Any] = field(default_factory=dict)
    standardize: bool = False           # z-score latents (per feature) inside the alignment
    # start this model's alignment from a finished run's trained one (its directory: the model of the same
    # name there, or DIR#i for its model i) instead of a random rotation; e.g. each model's run alone (DAS)
    # before a joint run. Kind, k, width and standardisation must match; a standardised alignment keeps this
    # run's own mean and std. The copied tensors' digest is part of the fingerprint, not the path
    alignment_init: str | None = None

    def problems(self, where: str) -> list[str]:
        """What is wrong with this entry alone (``where``: its config path, e.g. ``models.0``)."""
        try:
            Site.parse(self.site)
        except ConfigError as e:
            return [f"{where}.site: {e}"]
        return []


@dataclass
class TaskModelConfig(ModelConfigBase):
    """A task model (GRU / LSTM / Transformer trained by ``llm-mas train-model``)."""

    kind: Literal["task"] = "task"
    variable_map: dict[str, str] = field(default_factory=dict)  # shared variable -> this model's variable
    untrained: bool = False             # control: a freshly initialised copy of this architecture (chance level)

    def problems(self, where: str) -> list[str]:
        return []  # names, sites and variables are checked from the checkpoint (run_config.task_model_infos)


@dataclass
class HFModelConfig(ModelConfigBase):
    """A Hugging Face causal LM and the recording of its own generations (``llm-mas record``)."""

    kind: Literal["hf"] = "hf"
    site: str = "embeddings"            # "embeddings", "layer{l}" or a module path
    recording: str | None = None        # directory written by `llm-mas record` for this model
    adapter: str | None = None          # optional PEFT adapter directory
    dtype: str = "float32"              # float32 | bfloat16 | float16 | auto
    device: str | None = None           # this model's device (default: the run's device)
    backend: str = "torch"              # torch | nnsight | tlens
    # stepwise LLM MAS at a layer{l} site: a step runs layers l+1.. from the pairs' cached layer-l outputs
    # (same results; torch and nnsight backends; false: every step runs the whole model)
    skip_below_site: bool = True

    def problems(self, where: str, needs_recording: bool = True) -> list[str]:
        """What is wrong with this entry (``where``: its config path, e.g. ``models.0``). Whether the recording
        exists is checked when the run builds its problem (a recipe may plan runs before recording); a
        counterfactual run (data.dataset / data.task) needs none."""
        from ..backends import BACKENDS, backend_facts
        from ..llm.loading import DTYPES

        p = []
        if self.backend not in BACKENDS:
            p.append(f"{where}.backend: unknown backend {self.backend!r}; valid choices: {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            p.append(f"{where}.dtype: unknown dtype {self.dtype!r}; valid choices: {', '.join(DTYPES)}")
        if self.recording is None and needs_recording:
            p.append(f"{where}.recording: an HF model needs a recording directory; make one with "
                     f"`llm-mas record --model {self.name} --texts TEXTS --out DIR`")
        if self.adapter is not None and self.backend in BACKENDS and backend_facts(self.backend).converts_model:
            p.append(f"{where}.adapter: the {self.backend} backend needs merged weights; point name at the merged model "
                     "(`llm-mas finetune ... --merge` writes OUT/merged) and record that model")
        if self.site == "hidden":
            p.append(f"{where}.site: 'hidden' is a task-model site; an HF model's sites are 'embeddings' (the "
                     "default), 'layer{l}' (the output of decoder block l) or a module path")
        else:
            try:
                Site.parse(self.site)
            except ConfigError as e:
                p.append(f"{where}.site: {e}")
        return p


@dataclass
class ModuleModelConfig(ModelConfigBase):
    """Any ``torch.nn.Module``: ``factory`` ("package.module:function", called with ``kwargs``) builds it and
    ``weights`` (a .safetensors file, or a torch file of plain tensors, holding its ``state_dict``) fills it;
    in Python, ``module`` may be the object itself (it is frozen for the run: eval mode, no gradients).

    site: a module path (``rnn``, ``encoder.layers.1``), a `HookPoint`'s path, or an alias the module's
    ``site_aliases()`` gives. A site at an ``nn.RNN``/``nn.GRU``/``nn.LSTM`` is its state at each step, and
    an edit there feeds the recurrence (`llm_mas.models.recurrent`).
    """

    kind: Literal["module"] = "module"
    site: str = "hidden"
    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: str | None = None           # this model's device (default: the run's device)
    module: Any = field(default=None, metadata={"runtime": True})   # Python only; never written to config.yaml

    def problems(self, where: str) -> list[str]:
        p = super().problems(where)
        if self.module is not None:
            from torch import nn

            if not isinstance(self.module, nn.Module):
                p.append(f"{where}.module: expected a torch.nn.Module, got {type(self.module).__name__}")
            if self.factory is not None or self.weights is not None:
                p.append(f"{where}: give either the module object or factory/weights, not both")
            return p
        if self.factory is None:
            p.append(f"{where}.factory: a module model needs a factory 'package.module:function' that builds it "
                     "(and weights: its state_dict file); in Python pass the nn.Module itself to compare(models=...)")
        elif self.factory.count(":") != 1 or not all(self.factory.split(":")):
            p.append(f"{where}.factory: {self.factory!r} must be an import path 'package.module:function'")
        if self.weights is not None and not Path(self.weights).is_file():
            p.append(f"{where}.weights: {self.weights!r} does not exist; give the file of the module's state_dict "
                     "(save it with safetensors.torch.save_file(model.state_dict(), PATH))")
        return p


@dataclass
class RecordedModelConfig(ModelConfigBase):
    """A recorded system (`llm_mas.RecordedSystem`): latents (N, T, d) and causal states, known only from a
    recording (``path``: a directory written by ``RecordedSystem.save``; in Python ``recording`` may be the
    object). It cannot be run: list it in ``cl.inaccessible`` so directions into it are CL-trained (matched
    on its states, ``cl.match_on``); its inputs in the counterfactual tensors are trial indices
    (``RecordedSystem.inputs``) and its labels the intended states."""

    kind: Literal["recorded"] = "recorded"
    site: str = "latents"
    path: str | None = None
    recording: Any = field(default=None, metadata={"runtime": True})   # Python only; never written to config.yaml

    def problems(self, where: str) -> list[str]:
        from ..recordings import TENSOR_FILE, RecordedSystem

        p = []
        if self.site != "latents":
            p.append(f"{where}.site: a recording has one site, 'latents'; got {self.site!r}")
        if self.recording is not None:
            if not isinstance(self.recording, RecordedSystem):
                p.append(f"{where}.recording: expected llm_mas.RecordedSystem, got {type(self.recording).__name__}")
            if self.path is not None:
                p.append(f"{where}: give either the recording object or its path, not both")
        elif self.path is None:
            p.append(f"{where}.path: a recorded model needs the directory of its recording "
                     "(RecordedSystem(...).save(DIR)); in Python pass the RecordedSystem to compare(models=...)")
        elif not (Path(self.path) / TENSOR_FILE).is_file():
            p.append(f"{where}.path: {self.path!r} holds no {TENSOR_FILE}; write it with RecordedSystem(...).save(DIR)")
        return p


@dataclass
class GenericModelConfig(ModelConfigBase):
    """The entry of a kind registered without its own schema: the common keys and free ``options``."""

    kind: str = ""
    options: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ the registry
@dataclass
class LoadedModel:
    """One model ready for a tensor run: what runs, its backend, its resolved site, its latent width (None:
    read from the first latents collected)."""

    model: Any
    backend: Any
    site: Site
    width: int | None = None


@dataclass
class ModelKind:
    """A model kind (module docstring)."""

    name: str
    schema: type = GenericModelConfig
    build: ProblemBuilder | None = None
    load: Callable[..., LoadedModel] | None = None
    check: Callable[[Any], tuple[list[str], list[str]]] | None = None
    fingerprint: Callable[[Any], dict[str, str]] | None = None
    description: str = ""


KINDS: dict[str, ModelKind] = {}


def register_kind(kind: ModelKind) -> ModelKind:
    """Add a model kind (a name can be registered once). Its schema must be a dataclass with the common keys
    (a `ModelConfigBase` subclass)."""
    if not isinstance(kind.name, str) or not kind.name.isidentifier():
        raise ConfigError(f"a model kind's name must be an identifier, got {kind.name!r}")
    if kind.name in KINDS:
        raise ConfigError(f"model kind {kind.name!r} is already registered ({KINDS[kind.name].schema.__name__})")
    if not (isinstance(kind.schema, type) and issubclass(kind.schema, ModelConfigBase)):
        raise ConfigError(f"model kind {kind.name!r}: schema must be a dataclass subclassing ModelConfigBase")
    if "kind" not in {f.name for f in fields(kind.schema)}:
        raise ConfigError(f"model kind {kind.name!r}: schema {kind.schema.__name__} needs a `kind` field")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ConfigError(f"unknown model kind {name!r}; registered: {', '.join(KINDS)}")
    return KINDS[name]


class ModelConfigArms:
    """The type of a run config's model entry: the registered kinds' schemas, told apart by ``kind`` (the
    first registered, ``task``, when an entry gives none). `llm_mas.config` asks ``__config_arms__``."""

    def __config_arms__(self) -> dict[str, type]:
        return {name: kind.schema for name, kind in KINDS.items()}

    def __repr__(self) -> str:
        return "ModelConfig"


MODEL_CONFIG = ModelConfigArms()


def entry_kind(entry: Any) -> ModelKind | None:
    kind = getattr(entry, "kind", None)
    return KINDS.get(kind) if isinstance(kind, str) else None


def load_model(entry: Any, index: int, device: str, log: Callable[[str], None]) -> LoadedModel:
    """Entry ``index`` loaded by its kind for a tensor run."""
    kind = get_kind(entry.kind)
    if kind.load is None:
        raise ConfigError(f"models.{index}: model kind {kind.name!r} cannot run on counterfactual tensors (it has "
                          "no loader); register its kind with load=...")
    return kind.load(entry, index, device, log)


def model_fingerprint(entry: Any) -> dict[str, str]:
    kind = entry_kind(entry)
    return kind.fingerprint(entry) if kind is not None and kind.fingerprint is not None else {}


def tensor_dataset(config):
    """The counterfactual tensors of a run: ``data.tensors`` (Python) or the directory ``data.dataset``."""
    from ..tasks.tensor_data import CounterfactualTensors

    data = config.data
    if getattr(data, "tensors", None) is not None:
        if not isinstance(data.tensors, CounterfactualTensors):
            raise ConfigError(f"data.tensors: expected llm_mas.CounterfactualTensors, got {type(data.tensors).__name__}")
        return data.tensors
    # read once per run (fingerprint, checks, problem): the directory's files, keyed by their size and mtime
    from ..tasks.tensor_data import META_FILE, TENSOR_FILE

    directory = Path(data.dataset).resolve()
    try:
        key = (str(directory),) + tuple((p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in (directory / TENSOR_FILE, directory / META_FILE))
    except OSError:
        return CounterfactualTensors.load(directory)  # names the missing file
    if _LOADED.get("key") != key:
        _LOADED.update(key=key, data=CounterfactualTensors.load(directory))
    return _LOADED["data"]


_LOADED: dict[str, Any] = {}   # the last tensor directory read (one at a time: a run reads one)


def entry_device(entry: Any, default: str) -> str:
    """Where a model runs: its own ``device``; a module object given in Python stays where it is (its first
    parameter's device) unless a device is set; else the run's device."""
    if getattr(entry, "device", None) is not None:
        return entry.device
    module = getattr(entry, "module", None)
    if module is not None:
        tensor = next(iter(module.parameters()), None)
        if tensor is None:
            tensor = next(iter(module.buffers()), None)
        if tensor is not None:
            return str(tensor.device)
    return default


# ------------------------------------------------------------------------------------------ module kind
def _load_module(entry: ModuleModelConfig, index: int, device: str, log) -> LoadedModel:
    from ..backends.torch_hooks import TorchHookBackend, get_module
    from ..models.recurrent import stepped_site
    from ..sites import resolve_site

    where = f"models.{index}"
    if entry.module is not None:
        module = entry.module
    else:
        module = build_module(entry.factory, entry.kwargs, where)
        if entry.weights is not None:
            state = read_weights(entry.weights, where)
            result = module.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise DataError(f"{where}.weights: {entry.weights!r} does not fit {entry.factory}: missing "
                                f"{list(result.missing_keys)[:6]}, unexpected {list(result.unexpected_keys)[:6]}")
    module.eval().requires_grad_(False).to(device)
    view, site = stepped_site(module, resolve_site(module, entry.site))
    get_module(view, site)  # a wrong path: SiteError listing close names
    log(f"{where}: {entry.name} ({type(module).__name__}, site {site})")
    return LoadedModel(view, TorchHookBackend(), site, None)


def _check_module_entry(config, index: int) -> list[str]:
    """A module entry's factory imports and builds, its weights fit, its site exists (nothing is trained)."""
    from ..backends.torch_hooks import get_module
    from ..models.recurrent import stepped_site
    from ..sites import resolve_site

    entry = config.models[index]
    where = f"models.{index}"
    try:
        module = entry.module if entry.module is not None else build_module(entry.factory, entry.kwargs, where)
    except ConfigError as e:
        return list(e.problems)
    problems = []
    if entry.module is None and entry.weights is not None and Path(entry.weights).is_file():
        try:
            state = read_weights(entry.weights, where)
            own = module.state_dict()
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
            if missing or unexpected or shapes:
                problems.append(f"{where}.weights: {entry.weights!r} does not fit {entry.factory}(**{entry.kwargs}): "
                                f"missing {missing[:6]}, unexpected {unexpected[:6]}, other shapes {sorted(shapes)[:6]}")
        except DataError as e:
            problems.append(str(e))
    try:
        view, site = stepped_site(module, resolve_site(module, entry.site))
        get_module(view, site)
    except MASError as e:
        problems.append(f"{where}.site: {e}")
    return problems


def _check_modules(config) -> tuple[list[str], list[str]]:
    problems = [p for i, m in enumerate(config.models) if getattr(m, "kind", None) == "module"
                for p in _check_module_entry(config, i)]
    return problems, []


def _module_fingerprint(entry: ModuleModelConfig) -> dict[str, str]:
    from ..files import file_digest

    if entry.module is not None:
        return {"weights": state_digest(entry.module), "class": type(entry.module).__qualname__}
    if entry.weights is not None and Path(entry.weights).is_file():
        return {"weights": file_digest(entry.weights)}
    return {"weights": "missing" if entry.weights is not None else "factory initialisation"}


# ------------------------------------------------------------------------------------------ recorded kind
def _recording(entry: RecordedModelConfig):
    from ..recordings import RecordedSystem

    return entry.recording if entry.recording is not None else RecordedSystem.load(entry.path)


def _load_recorded(entry: RecordedModelConfig, index: int, device: str, log) -> LoadedModel:
    from ..backends.torch_hooks import TorchHookBackend

    recording = _recording(entry)
    module = recording.module().eval().requires_grad_(False).to(device)
    log(f"models.{index}: {entry.name} (recording of {recording.n_trials} trials x {recording.n_steps} steps x "
        f"{recording.width} units; states {sorted(recording.states)})")
    return LoadedModel(module, TorchHookBackend(), Site.parse("latents"), recording.width)


def _recorded_fingerprint(entry: RecordedModelConfig) -> dict[str, str]:
    from ..models.modules import tensors_digest

    if entry.recording is None and (entry.path is None or not Path(entry.path).is_dir()):
        return {"latents": "missing"}
    recording = _recording(entry)
    return {"latents": tensors_digest({"latents": recording.latents,
                                       **{f"state.{k}": v for k, v in recording.states.items()}})}


# ------------------------------------------------------------------------------------------ task / hf kinds
def _hf_weights_digest(name: str) -> str:
    """A digest of an HF model's (or adapter's) weight files and config; hub ids from the local cache only."""
    from ..files import tree_digest
    from ..llm.loading import resolve_model_location

    try:
        location, local = resolve_model_location(name)
    except ConfigError:
        return f"not found: {name}"
    if not local:
        try:  # the local HF cache only (no network)
            from huggingface_hub import snapshot_download

            location = snapshot_download(name, local_files_only=True)
        except Exception:
            return f"hub id {name} (not resolvable locally: weights not fingerprinted)"
    files = [p for p in Path(location).iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name in ("config.json", "adapter_config.json"))]
    return tree_digest(files)


def _task_fingerprint(entry: TaskModelConfig) -> dict[str, str]:
    from ..files import file_digest
    from ..models.registry import resolve_model_dir

    model_dir = resolve_model_dir(entry.name)[0]
    return {name: file_digest(model_dir / name) if (model_dir / name).exists() else "missing"
            for name in ("model.safetensors", "config.yaml")}


def _hf_fingerprint(entry: HFModelConfig) -> dict[str, str]:
    from ..files import file_digest

    digests = {"weights": _hf_weights_digest(entry.name)}
    if entry.adapter is not None:
        digests["adapter"] = _hf_weights_digest(entry.adapter)
    recording = Path(entry.recording) / "recording.safetensors" if entry.recording else None
    digests["recording"] = file_digest(recording) if recording and recording.is_file() else "missing"
    return digests


def _load_task_or_hf(entry, index: int, device: str, log) -> LoadedModel:
    from .counterfactual import _load_model

    model, backend, site, width = _load_model(entry, index, device, log)
    return LoadedModel(model, backend, site, width)


def _register_builtins() -> None:
    from .llm import build_llm_problem, check_hf_models
    from .task import build_task_problem, check_task_models

    register_kind(ModelKind("task", TaskModelConfig, build=build_task_problem, load=_load_task_or_hf,
                            check=check_task_models, fingerprint=_task_fingerprint,
                            description="a shipped or trained task model"))
    register_kind(ModelKind("hf", HFModelConfig, build=build_llm_problem, load=_load_task_or_hf,
                            check=check_hf_models, fingerprint=_hf_fingerprint,
                            description="a Hugging Face causal LM"))
    register_kind(ModelKind("module", ModuleModelConfig, load=_load_module, check=_check_modules,
                            fingerprint=_module_fingerprint, description="any torch.nn.Module"))
    register_kind(ModelKind("recorded", RecordedModelConfig, load=_load_recorded, fingerprint=_recorded_fingerprint,
                            description="recorded latents with causal states (causally inaccessible: CLMAS)"))
