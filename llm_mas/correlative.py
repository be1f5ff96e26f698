"""Correlative similarity between models (RSA, CKA), collected through the same sites and backends as MAS.

    llm-mas similarity similarity_gru_gru n_rows=1000 models.1.site=embeddings

    from llm_mas.correlative import collect_rows, default_sequences
    rows = collect_rows([gru, transformer], "hidden")           # 300 MultiObject sequences, 15 per N
    compare_representations(rows.latents[0], rows.latents[1])   # llm_mas.similarity: RSA × 4, CKA × 2

Rows (docs/method.md §13): the SAME token sequences are run through every model,
teacher forced, and every non-pad position of every sequence is one row, in the same (sequence, position)
order for every model, so row i of one model and row i of another are the latents of the same token.
BOS and EOS positions are rows too (as in the paper's code); at the embedding site the rows only depend on the
token, so many rows repeat.

The default sequences follow the paper: 15 per quantity N = 1..20 of the models' task (MultiObject), drawn
from a seeded generator. Any pair of task models and sites works (``embeddings``, ``hidden``, ``layer{l}``
or a hook path); Hugging Face models work through the same backend interface when the sequences are given
as ``{"input_ids", "attention_mask"}`` (rows = positions where the attention mask is 1).

A run (``run_similarity``) writes ``runs/<name>/config.yaml`` (first line: the command) and
``similarity.json`` (per pair of models, every measure's mean, std and per-subsample values).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import from_dict, load_config, save_config
from .errors import ConfigError, DataError

DEFAULT_PER_QUANTITY = 15
DEFAULT_QUANTITIES = tuple(range(1, 21))
# Display order of the measures in tables (keys of llm_mas.similarity.compare_representations).
MEASURES = ("rsa_cosine_spearman", "rsa_cosine_pearson", "rsa_euclidean_spearman", "rsa_euclidean_pearson",
            "cka_biased", "cka_unbiased")


# ============================================================================================ sequences
def default_sequences(task: Any = "multiobject", per_quantity: int = DEFAULT_PER_QUANTITY,
                      quantities: Sequence[int] = DEFAULT_QUANTITIES, seed: int = 0):
    """The paper's RSA/CKA data: `per_quantity` sequences for each quantity N, in order of N (seeded).

    Returns a ``SequenceBatch`` of ``per_quantity · len(quantities)`` rows (300 by default), right padded
    with PAD to one width.
    """
    from .tasks import SequenceBatch, get_task

    task = get_task(task) if isinstance(task, str) else task
    if isinstance(per_quantity, bool) or not isinstance(per_quantity, (int, np.integer)) or per_quantity < 1:
        raise ConfigError(f"per_quantity={per_quantity!r} must be a positive integer, e.g. 15")
    quantities = [int(q) for q in quantities]
    if not quantities:
        raise ConfigError("quantities is empty; pass the quantities N to draw sequences for, e.g. 1..20")
    rng = np.random.default_rng(seed)
    batches = [task.sample(int(per_quantity), rng, quantities=[q]) for q in quantities]
    width = max(b.width for b in batches)
    batches = [b.pad_to(width) for b in batches]
    return SequenceBatch(np.concatenate([b.ids for b in batches]), np.concatenate([b.task_mask for b in batches]),
                         np.concatenate([b.lengths for b in batches]))


def _model_task(models: Sequence[Any]) -> str:
    """The task every model was trained on (sequences must be the same token strings for all)."""
    tasks = [getattr(m, "task_name", None) for m in models]
    if any(t is None for t in tasks):
        raise ConfigError("a model has no task_name (not a task model?); pass `sequences` explicitly, e.g. "
                          "{'input_ids': ..., 'attention_mask': ...} for Hugging Face models")
    if len(set(tasks)) != 1:
        raise ConfigError(f"the models were trained on different tasks {tasks}; RSA/CKA need the same token "
                          f"sequences in every model: compare models of one task")
    return tasks[0]


# ================================================================================================= rows
@dataclass
class Rows:
    """Latents of the same token positions in several models.

    latents: one float32 array (n_rows, d_i) per model, row i = the same token of the same sequence in all.
    sequence_index, position, token_id: (n_rows,) where each row comes from (token_id -1: continuous inputs).
    sites: the resolved site (canonical string) per model.
    """

    latents: list[np.ndarray]
    sequence_index: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    sites: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.sequence_index.shape[0])


def _as_inputs(sequences: Any) -> tuple[Any, np.ndarray]:
    """Backend inputs and the (B, T) bool mask of row positions. Inputs: {name: (B, T) LongTensor} for token
    sequences, the tensor itself for continuous inputs (B, T, n_in) (``model(x)``), or a mapping of tensors
    passed as keyword arguments (rows: ``attention_mask`` where given, else every step of the time axis)."""
    import torch

    from .tasks import PAD, SequenceBatch
    from .tasks.tensor_data import time_length

    if isinstance(sequences, SequenceBatch):
        ids = torch.as_tensor(sequences.ids, dtype=torch.long)  # (B, T)
        return {"input_ids": ids}, sequences.ids != PAD
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(sequences)
        if x.is_floating_point():
            if x.dim() != 3:
                raise DataError(f"continuous inputs have shape {tuple(x.shape)}; expected (batch, steps, n_in)")
            return x.float(), np.ones(tuple(x.shape[:2]), dtype=bool)
        sequences = {"input_ids": x}
    if isinstance(sequences, Mapping):
        inputs = {k: torch.as_tensor(np.asarray(v) if not hasattr(v, "detach") else v) for k, v in sequences.items()}
        ids = inputs.get("input_ids")
        if ids is None:
            if not inputs:
                raise DataError("sequences is an empty mapping; pass 'input_ids' (B, T) or the model's inputs")
            first = next(iter(inputs.values()))
            shape = (int(first.shape[0]), time_length(inputs))
        elif ids.dim() != 2:
            raise DataError(f"input_ids has shape {tuple(ids.shape)}; expected (batch, seq) token ids (continuous "
                            "inputs (batch, steps, n_in): pass the float tensor itself)")
        else:
            shape = tuple(ids.shape)
        mask = inputs.get("attention_mask")
        if mask is None:
            return inputs, np.ones(shape, dtype=bool)
        if tuple(mask.shape) != shape:
            raise DataError(f"attention_mask has shape {tuple(mask.shape)} but the inputs {shape}")
        return inputs, mask.detach().cpu().numpy() != 0
    raise DataError(f"sequences of type {type(sequences).__name__} are not supported; pass a task SequenceBatch "
                    f"(llm_mas.correlative.default_sequences), token ids (B, T), continuous inputs (B, T, n_in) or "
                    "a mapping of the models' input tensors")


def _backends(backend: Any, n: int) -> list[Any]:
    from .backends import TorchHookBackend, get_backend

    items = list(backend) if isinstance(backend, (list, tuple)) else [backend] * n
    if len(items) != n:
        raise ConfigError(f"got {len(items)} backends for {n} models; pass one backend or one per model")
    return [TorchHookBackend() if b is None else get_backend(b) if isinstance(b, str) else b for b in items]


def collect_rows(models: Sequence[Any], sites: str | Sequence[str], sequences: Any = None, backend: Any = None,
                 batch_size: int = 256, device: str | None = None) -> Rows:
    """Latents of every non-pad position of the same sequences in every model (teacher forced).

    Args:
        models: task models, HF models, or any ``nn.Module`` the backend can run.
        sites: one site for every model or one per model (``"embeddings"``, ``"hidden"``, ``"layer0"``,
            a hook path such as ``"hook_layers.0"``, an HF module path for LLMs, or a module path; at an
            ``nn.RNN``/``nn.GRU``/``nn.LSTM`` its state at every step).
        sequences: a task ``SequenceBatch`` (rows = positions whose id is not PAD), token ids (B, T),
            continuous inputs (B, T, n_in) (a float tensor: rows = every step), or a mapping of the models'
            input tensors, e.g. ``input_ids`` (B, T) and ``attention_mask`` (rows = positions where it is
            1); default: :func:`default_sequences` of the models' task.
        backend: a backend object or registry name (``torch``, ``nnsight``, ``tlens``), or one per model;
            default the plain-torch hook backend.
        batch_size: sequences per forward pass.
        device: where inputs go (default: the device of each model's first parameter).

    Models run in eval mode without gradients (their train/eval mode is restored afterwards).
    """
    import torch

    models = list(models)
    if not models:
        raise ConfigError("models is empty; pass at least one model")
    site_list = [sites] * len(models) if isinstance(sites, str) else list(sites)
    if len(site_list) != len(models):
        raise ConfigError(f"got {len(site_list)} sites for {len(models)} models; pass one site or one per model")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    backends = _backends(backend, len(models))
    from .backends import TorchHookBackend
    from .sites import resolve_site

    if sequences is None:
        sequences = default_sequences(_model_task(models))
    inputs, row_mask = _as_inputs(sequences)  # row_mask (B, T) bool
    if not row_mask.any():
        raise DataError("the sequences have no non-pad positions; nothing to collect")
    from .models.recurrent import stepped_site

    views = []
    for i, (model, site) in enumerate(zip(models, site_list)):
        if isinstance(backends[i], TorchHookBackend):  # an RNN module's site: its state at every step
            model, site = stepped_site(model, resolve_site(model, site))
            site_list[i] = site
        views.append(model)
    resolved = [b.resolve(m, s) for b, m, s in zip(backends, views, site_list)]
    n_seq = row_mask.shape[0]
    latents: list[list[np.ndarray]] = [[] for _ in models]
    for i, (model, bk, site) in enumerate(zip(models, backends, resolved)):
        was_training = bool(getattr(model, "training", False))
        if hasattr(model, "eval"):
            model.eval()
        try:
            params = list(model.parameters()) if hasattr(model, "parameters") else []
            dev = device or (params[0].device if params else "cpu")
            for start in range(0, n_seq, batch_size):
                stop = min(start + batch_size, n_seq)
                chunk = (inputs[start:stop].to(dev) if isinstance(inputs, torch.Tensor)
                         else {k: v[start:stop].to(dev) for k, v in inputs.items()})  # each (b, T, ...)
                with torch.no_grad():
                    try:
                        out = bk.collect(views[i], chunk, [site])[str(site)]  # (b, T', d)
                    except TypeError as e:  # the model's forward does not take these inputs
                        given = (f"keyword inputs {sorted(chunk)}" if isinstance(chunk, dict)
                                 else f"a tensor of shape {tuple(chunk.shape)}")
                        raise DataError(f"model {i} ({type(model).__name__}) does not take {given}: {e}; pass "
                                        "token ids as 'input_ids' (B, T), continuous inputs (B, T, n_in) as a float "
                                        "tensor, or the names its forward takes") from None
                if out.dim() != 3 or tuple(out.shape[:2]) != (stop - start, row_mask.shape[1]):
                    raise DataError(f"site {site} of model {i} gave latents of shape {tuple(out.shape)} for "
                                    f"{stop - start} sequences of {row_mask.shape[1]} steps; pick a site with one "
                                    "latent per position (B, T, d)")
                mask = torch.as_tensor(row_mask[start:stop], device=out.device)  # (b, T)
                latents[i].append(out[mask].float().cpu().numpy())  # (rows in chunk, d), row-major order
        finally:
            if hasattr(model, "train"):
                model.train(was_training)
    seq_index, position = np.nonzero(row_mask)  # row-major: the order of out[mask] above
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    # continuous inputs have no token: token_id -1
    token_id = (ids.detach().cpu().numpy()[seq_index, position] if ids is not None
                else np.full(len(seq_index), -1))
    return Rows(latents=[np.concatenate(parts) for parts in latents], sequence_index=seq_index.astype(np.int64),
                position=position.astype(np.int64), token_id=token_id.astype(np.int64),
                sites=[str(s) for s in resolved])


# =============================================================================================== config
@dataclass
class SimilarityModelConfig:
    name: str                          # task: shipped task model (llm-mas list-models) or a checkpoint directory;
                                       # module: a display name
    site: str = "hidden"               # embeddings | hidden | layer{l} | a hook path | a module path
    backend: str = "torch"             # torch | nnsight | tlens
    kind: str = "task"                 # task | module (any torch module: factory + weights, as in MAS configs)
    factory: str | None = None         # module: "package.module:function" building it
    weights: str | None = None         # module: its state_dict (.safetensors or a torch file of tensors)
    kwargs: dict[str, Any] = field(default_factory=dict)   # module: the factory's arguments

    def validate(self) -> list[str]:
        from .backends import BACKENDS  # the one backend registry (imports torch: not at module import)

        p = []
        if self.backend not in BACKENDS:
            p.append(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.kind not in ("task", "module"):
            p.append(f"kind {self.kind!r} is not one of 'task', 'module'")
        elif self.kind == "module" and self.factory is None:
            p.append("factory: a module model needs 'package.module:function' that builds it (and weights)")
        return p


@dataclass
class SequencesConfig:
    task: str | None = None            # default: the task the models were trained on
    per_quantity: int = DEFAULT_PER_QUANTITY
    quantities: list[int] = field(default_factory=lambda: list(DEFAULT_QUANTITIES))
    seed: int | None = None            # default: the run's seed
    # instead of task sequences: a .safetensors file of the models' inputs: "inputs" (B, T, n_in) float or
    # (B, T) ids passed positionally, or named tensors passed as keyword arguments (rows: every step, or
    # where "attention_mask" is 1)
    file: str | None = None

    def validate(self) -> list[str]:
        p = []
        if self.file is not None and not Path(self.file).is_file():
            p.append(f"sequences.file: {self.file!r} does not exist")
        if self.per_quantity < 1:
            p.append(f"sequences.per_quantity must be >= 1, got {self.per_quantity}")
        if not self.quantities:
            p.append("sequences.quantities is empty; list the quantities N, e.g. [1, 2, ..., 20]")
        if self.task is not None:
            from .tasks import task_names

            if self.task.lower() not in task_names():
                p.append(f"sequences.task {self.task!r} is not one of {', '.join(task_names())}")
        return p


@dataclass
class SimilarityConfig:
    """RSA and CKA between the latents of several models at their sites (all unordered pairs by default)."""

    models: list[SimilarityModelConfig]
    name: str = "similarity"
    seed: int = 0
    n_rows: int = 1000                 # rows per subsample (RSA builds n_rows × n_rows RDMs)
    n_repeats: int = 10                # subsamples; means and stds are over these
    pairs: str | list[list[int]] = "all"   # all (every i < j) | [[i, j], ...]
    sequences: SequencesConfig = field(default_factory=SequencesConfig)
    batch_size: int = 256              # sequences per forward pass
    out_dir: str = "runs"
    device: str = "cpu"

    def validate(self) -> list[str]:
        p = []
        if len(self.models) < 2:
            p.append(f"models: list at least two entries to compare (got {len(self.models)}); the same model "
                     f"may appear twice with different sites")
        if self.n_rows < 4:
            p.append(f"n_rows must be >= 4 (CKA's unbiased estimator needs 4 rows), got {self.n_rows}")
        if self.n_repeats < 1:
            p.append(f"n_repeats must be >= 1, got {self.n_repeats}")
        if self.batch_size < 1:
            p.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            p.append(f"device {self.device!r} must be cpu or cuda[:i]")
        if not self.name or "/" in self.name:
            p.append(f"name {self.name!r} must be a non-empty directory name without '/'")
        if isinstance(self.pairs, str):
            if self.pairs != "all":
                p.append(f"pairs {self.pairs!r} must be 'all' or a list of [i, j] model indices")
        else:
            for pair in self.pairs:
                if len(pair) != 2 or not all(0 <= x < len(self.models) for x in pair) or pair[0] == pair[1]:
                    p.append(f"pairs: {pair} must be [i, j] with i != j in 0..{len(self.models) - 1}")
        return p

    def model_pairs(self) -> list[tuple[int, int]]:
        n = len(self.models)
        if self.pairs == "all":
            return [(i, j) for i in range(n) for j in range(i + 1, n)]
        return [(int(i), int(j)) for i, j in self.pairs]


def load_similarity_config(path: str | Path | None, overrides: Sequence[str] = (),
                           base: dict | None = None) -> SimilarityConfig:
    """Preset YAML + ``key.sub=value`` overrides -> validated `SimilarityConfig` (all problems at once)."""
    return load_config(SimilarityConfig, path, overrides, base=base)


def similarity_config(**values: Any) -> SimilarityConfig:
    """A validated `SimilarityConfig` from keyword arguments (the YAML keys)."""
    return from_dict(SimilarityConfig, values)


# ================================================================================================== run
def _load_models(config: SimilarityConfig) -> list[Any]:
    """Load every model; every name that fails is reported at once."""
    from .models import load_task_model
    from .models.modules import build_module, read_weights

    models, problems = [], []
    for i, entry in enumerate(config.models):
        try:
            if entry.kind == "module":
                module = build_module(entry.factory, entry.kwargs, f"models.{i}")
                if entry.weights is not None:
                    module.load_state_dict(read_weights(entry.weights, f"models.{i}"))
                models.append(module.eval().requires_grad_(False).to(config.device))
            else:
                models.append(load_task_model(entry.name, device=config.device))
        except (ConfigError, DataError) as e:
            problems.append(f"models.{i}.name: {e}" if entry.kind == "task" else str(e))
        except RuntimeError as e:  # load_state_dict: keys or shapes do not fit
            problems.append(f"models.{i}.weights: {entry.weights!r} does not fit {entry.factory}: "
                            f"{str(e).splitlines()[0]}")
    if problems:
        raise ConfigError(problems)
    return models


def _file_sequences(path: str) -> Any:
    """The inputs in a .safetensors file: its "inputs" tensor alone, else its tensors by name."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors' own error type
        raise DataError(f"sequences.file: {path!r} is not a readable safetensors file ({e})") from None
    return tensors["inputs"] if set(tensors) == {"inputs"} else tensors


def run_similarity(config: SimilarityConfig, log=print) -> dict[str, Any]:
    """Collect rows for every model, compare every configured pair, write runs/<name>/; return the result.

    The result (also ``similarity.json``) holds ``models`` (name, site, width), ``n_sequences``,
    ``n_rows_total`` and ``pairs``: one entry per compared pair with ``metrics`` =
    :func:`llm_mas.similarity.compare_representations` (each measure's mean, std and per-subsample values).
    """
    import torch

    from .similarity import compare_representations

    t0 = time.perf_counter()
    run_dir = Path(config.out_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml", header=f"llm-mas similarity {run_dir / 'config.yaml'}")
    torch.manual_seed(config.seed)
    models = _load_models(config)
    if config.sequences.file is not None:
        sequences = _file_sequences(config.sequences.file)
        task = f"file {config.sequences.file}"
    else:
        task = config.sequences.task or _model_task(models)
        seq_seed = config.seed if config.sequences.seed is None else config.sequences.seed
        sequences = default_sequences(task, config.sequences.per_quantity, config.sequences.quantities, seq_seed)
    rows = collect_rows(models, [m.site for m in config.models], sequences,
                        backend=[m.backend for m in config.models], batch_size=config.batch_size)
    n_sequences = len(next(iter(sequences.values()))) if isinstance(sequences, Mapping) else len(sequences)
    log(f"[{config.name}] {len(rows)} rows from {n_sequences} {task} sequences "
        f"({time.perf_counter() - t0:.1f}s)")
    pairs = []
    for i, j in config.model_pairs():
        metrics = compare_representations(rows.latents[i], rows.latents[j], n_rows=config.n_rows,
                                          n_repeats=config.n_repeats, seed=config.seed)
        pairs.append({"a": i, "b": j, "model_a": config.models[i].name, "model_b": config.models[j].name,
                      "site_a": rows.sites[i], "site_b": rows.sites[j], "metrics": metrics})
        log(f"[{config.name}] {Path(config.models[i].name).name}@{config.models[i].site} vs "
            f"{Path(config.models[j].name).name}@{config.models[j].site}: " +
            ", ".join(f"{k} {metrics[k]['mean']:.3f}" for k in MEASURES))
    result = {"name": config.name, "task": task, "seed": config.seed,
              "models": [{"name": m.name, "site": m.site, "resolved_site": s, "width": int(x.shape[1])}
                         for m, s, x in zip(config.models, rows.sites, rows.latents)],
              "n_sequences": n_sequences, "n_rows_total": len(rows), "pairs": pairs,
              "seconds": round(time.perf_counter() - t0, 2)}
    (run_dir / "similarity.json").write_text(json.dumps(result, indent=1))
    result["run_dir"] = str(run_dir)
    return result


# ============================================================================================ reporting
def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{measure: mean, measure_std: std}`` for every measure of `compare_representations` output."""
    out: dict[str, float] = {}
    for key in MEASURES:
        out[f"{prefix}{key}"] = float(metrics[key]["mean"])
        out[f"{prefix}{key}_std"] = float(metrics[key]["std"])
    return out


def format_similarity_table(result: Mapping[str, Any]) -> str:
    """Plain-text table: one block per pair, one line per measure with mean ± std over the subsamples."""
    lines = []
    for pair in result["pairs"]:
        m = pair["metrics"]
        models = result["models"]
        lines.append(f"{models[pair['a']]['name']} @ {models[pair['a']]['site']}  vs  "
                     f"{models[pair['b']]['name']} @ {models[pair['b']]['site']}   "
                     f"({m['n_repeats']} subsamples of {m['n_rows']} of {m['n_total']} rows)")
        lines.append(f"  {'measure':<24} {'mean':>8}   {'std':>7}")
        for key in MEASURES:
            lines.append(f"  {key:<24} {m[key]['mean']:>8.4f} ± {m[key]['std']:>7.4f}")
        for key in ("cka_biased_all_rows", "cka_unbiased_all_rows"):
            lines.append(f"  {key:<24} {m[key]:>8.4f}")
    return "\n".join(lines)


def mas_direction_summary(records: Sequence[Mapping[str, Any]], variable: str | None = None,
                          metric: str = "trial_iia") -> dict[str, float]:
    """MAS IIA of a two-model run: each cross direction and their mean (plus the self directions).

    records: ``MASResult.records`` or the entries of ``results.json`` (source_index, target_index, variable,
    trial_iia, token_iia, ...).
    Returns ``{"a_to_b", "b_to_a", "cross_mean", "a_to_a", "b_to_b"}`` (NaN for a direction not evaluated).
    """
    # Records (MASResult.records) or their results.json form (mappings)
    records = [r if isinstance(r, Mapping) else {k: getattr(r, k) for k in
                                                   ("source_index", "target_index", "variable", metric)}
               for r in records]
    if not records:
        raise DataError("no MAS records to summarise; did the run finish (results.json)?")
    variable = variable or records[0]["variable"]
    cell = {(r["source_index"], r["target_index"]): float(r[metric]) for r in records if r["variable"] == variable}
    if not cell:
        raise DataError(f"no MAS records for variable {variable!r}; the run has "
                        f"{sorted({r['variable'] for r in records})}")
    if max(max(k) for k in cell) > 1:
        raise DataError("mas_direction_summary is for two-model runs; this run has more models")
    get = lambda s, t: cell.get((s, t), float("nan"))  # noqa: E731
    cross = [get(0, 1), get(1, 0)]
    return {"a_to_b": cross[0], "b_to_a": cross[1], "cross_mean": float(np.nanmean(cross)),
            "a_to_a": get(0, 0), "b_to_b": get(1, 1)}


__all__ = ["MEASURES", "Rows", "SequencesConfig", "SimilarityConfig", "SimilarityModelConfig", "collect_rows",
           "default_sequences", "flatten_metrics", "format_similarity_table", "load_similarity_config",
           "mas_direction_summary", "run_similarity", "similarity_config"]
