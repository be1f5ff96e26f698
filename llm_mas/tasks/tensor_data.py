"""Counterfactual data as tensors: `CounterfactualTensors`, for any torch module on any inputs.

One row is one counterfactual: a *base* input, a *source* input, where in each the latent is swapped, and
what the intervened model must then output. For a direction (source model s, target model t), row r runs
model t on ``base[t][r]``; at its positions ``base_positions[t][r]`` its latent is replaced (in the aligned
subspace) by model s's latent on ``source[s][r]`` at ``source_positions[s][r]`` (slot j to slot j); the
output is then scored against ``labels[t][r]``.

    data = CounterfactualTensors(base=x_base, source=x_source,             # (N, T, n_in) float, (N, T) ids
                                 base_positions=t_swap, source_positions=t_swap,   # (N,) or (N, P), -1 = none
                                 labels=y)                                 # (N, T_out) ids, -100 = not scored
    data.save("cf_data")                        # cf_data/data.safetensors + cf_data/data.json
    data = CounterfactualTensors.load("cf_data")

Every field is one value shared by every model or a Python list with one value per model (models may
read different inputs, e.g. different encodings of the same trials). Inputs are token ids (N, T) (an
integer tensor), continuous inputs (N, T, n_in) (a float tensor; (N, n_in) for a model without a time
axis), or a dict of tensors passed as keyword arguments (``model(**inputs)``).

Scoring (``scorer``): ``cross_entropy`` (the default: integer labels at output positions, -100 where not
scored; the model's output (N, T_out, V) or (N, V)), ``regression`` (float labels, NaN where not scored;
a scored value is right when within ``tolerance``), or ``"package.module:Name"`` naming a `Scorer`
subclass of the user's (built with ``scorer_options``). Trial IIA: every scored label of a row right.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..files import atomic_save_tensors, atomic_write_json

IGNORE_LABEL = -100
TENSOR_FILE = "data.safetensors"
META_FILE = "data.json"
FIELDS = ("base", "source", "base_positions", "source_positions", "labels")
_MAX_ROWS_NAMED = 6


# ------------------------------------------------------------------------------------------ scorers
class Scorer:
    """How a target's output is scored against a row's labels.

    ``scored(labels)`` -> (N,) number of scored labels per row; ``__call__(output, labels)`` ->
    (loss (B,) summed over each row's scored labels (differentiable), correct (B,), scored (B,)).
    ``check(output_shape, labels_shape)`` -> a problem (str) or None.
    """

    name = "scorer"
    options: dict[str, Any] = {}

    def scored(self, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_labels(self, labels: torch.Tensor) -> str | None:
        return None

    def __call__(self, output: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class CrossEntropyScorer(Scorer):
    """Integer labels (-100: not scored); output (B, ..., V) with labels (B, ...): the argmax is right."""

    name = "cross_entropy"

    def __init__(self) -> None:
        self.options = {}

    def check_labels(self, labels: torch.Tensor) -> str | None:
        if labels.is_floating_point() or labels.dtype == torch.bool:
            return (f"dtype {labels.dtype}: cross-entropy labels are class indices (an integer tensor, -100 where "
                    "not scored); for float targets use scorer='regression'")
        return None

    def scored(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_LABEL).reshape(len(labels), -1).sum(1)

    def __call__(self, output, labels):
        if output.dim() != labels.dim() + 1 or output.shape[:-1] != labels.shape:
            raise DataError(f"cross-entropy scoring: the model's output has shape {tuple(output.shape)} but the "
                            f"labels have {tuple(labels.shape)}; the output must be the labels' shape plus a class "
                            "axis (e.g. (B, T, V) for labels (B, T))")
        mask = labels != IGNORE_LABEL
        flat_out = output.reshape(-1, output.shape[-1]).float()
        flat_lab = labels.reshape(-1)
        keep = mask.reshape(-1)
        ce = torch.nn.functional.cross_entropy(flat_out[keep], flat_lab[keep], reduction="none")
        row = torch.arange(len(labels), device=labels.device).repeat_interleave(mask[0].numel())[keep]
        loss = torch.zeros(len(labels), device=ce.device).index_add(0, row, ce)
        ok = (flat_out[keep].argmax(-1) == flat_lab[keep]).float()
        correct = torch.zeros(len(labels), device=ok.device).index_add(0, row, ok)
        return loss, correct, mask.reshape(len(labels), -1).sum(1).float()


class RegressionScorer(Scorer):
    """Float labels (NaN: not scored); squared error; a value is right when |output − label| <= tolerance."""

    name = "regression"

    def __init__(self, tolerance: float = 0.1) -> None:
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
            raise ConfigError(f"scorer_options.tolerance must be a number >= 0, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.options = {"tolerance": self.tolerance}

    def check_labels(self, labels: torch.Tensor) -> str | None:
        if not labels.is_floating_point():
            return f"dtype {labels.dtype}: regression labels are floats (NaN where not scored)"
        return None

    def scored(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(labels).reshape(len(labels), -1).sum(1)

    def __call__(self, output, labels):
        if output.shape != labels.shape and output.shape[-1] == 1 and output.shape[:-1] == labels.shape:
            output = output[..., 0]
        if output.shape != labels.shape:
            raise DataError(f"regression scoring: the model's output has shape {tuple(output.shape)} but the labels "
                            f"have {tuple(labels.shape)}; they must match")
        mask = torch.isfinite(labels)
        err = torch.where(mask, output.float() - torch.nan_to_num(labels.float()), torch.zeros_like(output.float()))
        b = len(labels)
        loss = (err ** 2).reshape(b, -1).sum(1)
        correct = ((err.abs() <= self.tolerance) & mask).reshape(b, -1).sum(1).float()
        return loss, correct, mask.reshape(b, -1).sum(1).float()


SCORERS: dict[str, type[Scorer]] = {"cross_entropy": CrossEntropyScorer, "regression": RegressionScorer}


def make_scorer(scorer: str | Scorer, options: dict | None = None) -> Scorer:
    """A scorer by name (``cross_entropy``, ``regression``), by import path ``package.module:Name``, or as given."""
    if isinstance(scorer, Scorer):
        return scorer
    options = dict(options or {})
    if not isinstance(scorer, str):
        raise ConfigError(f"scorer must be a name ({', '.join(SCORERS)}), 'package.module:Name' or a Scorer, got "
                          f"{type(scorer).__name__}")
    if scorer in SCORERS:
        cls: Any = SCORERS[scorer]
    elif scorer.count(":") == 1:
        cls = import_object(scorer, "scorer")
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise ConfigError(f"scorer {scorer!r} is not a subclass of llm_mas.Scorer")
    else:
        raise ConfigError(f"unknown scorer {scorer!r}; valid: {', '.join(SCORERS)} or 'package.module:Name'")
    try:
        made = cls(**options)
    except TypeError as e:
        raise ConfigError(f"scorer {scorer!r}: bad scorer_options {options}: {e}") from None
    if not made.name or made.name == "scorer":
        made.name = scorer
    return made


def import_object(path: str, what: str) -> Any:
    """The object at ``package.module:attr`` (ConfigError naming the path and why it did not import)."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"{what} {path!r} must be an import path 'package.module:name'")
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's code: any error it raises on import is reported, with its type
        raise ConfigError(f"{what} {path!r}: module {module_name!r} does not import ({type(e).__name__}: {e}); "
                          "check the path and that its package is on PYTHONPATH (or installed)") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}; it has: "
                              f"{', '.join(names[:12])}")
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------------------ shapes
def time_length(inputs: torch.Tensor | dict) -> int:
    """The time axis length of one model's inputs: dim 1 of an integer tensor (N, T, ...) or of a float tensor
    with at least three dimensions (N, T, n_in); 1 for (N, n_in) float inputs; a dict: its first such tensor."""
    tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and (not x.is_floating_point() or x.dim() >= 3):
            return int(x.shape[1])
    return 1


def take_rows(inputs: torch.Tensor | dict, rows: torch.Tensor) -> torch.Tensor | dict:
    if isinstance(inputs, dict):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def inputs_to(inputs: torch.Tensor | dict, device) -> torch.Tensor | dict:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _rows_text(rows: Sequence[int]) -> str:
    rows = list(rows)
    shown = ", ".join(map(str, rows[:_MAX_ROWS_NAMED]))
    return ("row " if len(rows) == 1 else "rows ") + shown + (f" (+{len(rows) - _MAX_ROWS_NAMED} more)"
                                                              if len(rows) > _MAX_ROWS_NAMED else "")


# ------------------------------------------------------------------------------------------ the dataset
@dataclass
class CounterfactualTensors:
    """Counterfactual rows as tensors (module docstring). A list value of a field holds one value per model."""

    base: Any
    source: Any
    base_positions: Any
    source_positions: Any
    labels: Any
    scorer: str | Scorer = "cross_entropy"
    scorer_options: dict[str, Any] = field(default_factory=dict)
    variable: str = "full"
    info: dict[str, Any] = field(default_factory=dict)   # free metadata (saved in data.json)

    # ------------------------------------------------------------------ per model
    @property
    def n_models(self) -> int | None:
        """The number of models the per-model fields are given for (None: every field is shared)."""
        lengths = {len(getattr(self, f)) for f in FIELDS if isinstance(getattr(self, f), (list, tuple))}
        return lengths.pop() if len(lengths) == 1 else (None if not lengths else -1)

    def field_for(self, name: str, model: int) -> Any:
        value = getattr(self, name)
        return value[model] if isinstance(value, (list, tuple)) else value

    def __len__(self) -> int:
        first = self.field_for("labels", 0)
        return int(first.shape[0]) if isinstance(first, torch.Tensor) else 0

    def make_scorer(self) -> Scorer:
        return make_scorer(self.scorer, self.scorer_options)

    def positions(self, name: str, model: int) -> torch.Tensor:
        """(N, P) long positions of one model (-1: no position in this slot)."""
        p = self.field_for(name, model)
        return p[:, None] if p.dim() == 1 else p

    # ------------------------------------------------------------------ validation
    def problems(self, n_models: int | None = None) -> list[str]:
        """Every problem of the dataset at once (field and rows named); empty when it is valid.
        n_models: the number of models of the run (per-model lists must have that many items)."""
        p: list[str] = []
        per_model = self.n_models
        if per_model == -1:
            lengths = {f: len(getattr(self, f)) for f in FIELDS if isinstance(getattr(self, f), (list, tuple))}
            return [f"per-model fields have different lengths ({lengths}); give every per-model list one item "
                    "per model"]
        if per_model is not None and n_models is not None and per_model != n_models:
            p.append(f"the per-model fields hold {per_model} items but the run has {n_models} models; give one "
                     "item per model (or one shared tensor)")
        models = range(per_model or 1)
        try:
            scorer = self.make_scorer()
        except ConfigError as e:
            p.extend(f"scorer: {x}" for x in e.problems)
            scorer = None
        n_rows = None
        shapes_ok = True
        for i in models:
            suffix = f"[model {i}]" if per_model else ""
            for f in FIELDS:
                value = self.field_for(f, i)
                tensors = value.items() if isinstance(value, dict) and f in ("base", "source") else [(None, value)]
                for key, t in tensors:
                    w = f + suffix + (f"[{key!r}]" if key is not None else "")
                    if not isinstance(t, torch.Tensor):
                        p.append(f"{w}: expected a torch.Tensor"
                                 + (" or a dict of tensors" if f in ("base", "source") else "")
                                 + f", got {type(t).__name__}")
                        shapes_ok = False
                        continue
                    if t.dim() == 0:
                        p.append(f"{w}: a scalar; expected one row per counterfactual (first axis N)")
                        shapes_ok = False
                        continue
                    if n_rows is None:
                        n_rows = int(t.shape[0])
                    elif t.shape[0] != n_rows:
                        p.append(f"{w}: {t.shape[0]} rows (shape {tuple(t.shape)}) but other fields have {n_rows}; "
                                 "every field needs one row per counterfactual")
                        shapes_ok = False
                    if f in ("base", "source") and key is None:
                        if not t.is_floating_point() and t.dim() != 2:
                            p.append(f"{w}: integer inputs of shape {tuple(t.shape)}; token ids are (N, T)")
                            shapes_ok = False
                        elif t.is_floating_point() and not torch.isfinite(t).all():
                            bad = torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(1)).flatten().tolist()
                            p.append(f"{w}: non-finite values in {_rows_text(bad)}")
                    if f.endswith("positions"):
                        if t.is_floating_point() or t.dtype == torch.bool:
                            p.append(f"{w}: dtype {t.dtype}; positions are integers (-1 where a slot is unused)")
                            shapes_ok = False
                        elif t.dim() not in (1, 2):
                            p.append(f"{w}: shape {tuple(t.shape)}; positions are (N,) or (N, P)")
                            shapes_ok = False
                    if f == "labels" and scorer is not None:
                        bad_dtype = scorer.check_labels(t)
                        if bad_dtype:
                            p.append(f"{w}: {bad_dtype}")
                            shapes_ok = False
        if n_rows == 0:
            p.append("the dataset has no rows")
        if p or not shapes_ok:
            return p
        # positions: in range of the inputs' time axis, at least one per row, no repeats, same slots
        slots = {}
        for i in models:
            label = f" (model {i})" if per_model else ""
            for f, inputs_name in (("base_positions", "base"), ("source_positions", "source")):
                pos = self.positions(f, i)
                slots.setdefault(pos.shape[1], []).append(f + label)
                length = time_length(self.field_for(inputs_name, i))
                bad = torch.nonzero(((pos < -1) | (pos >= length)).any(1)).flatten().tolist()
                if bad:
                    p.append(f"{f}{label}: {_rows_text(bad)} hold positions outside 0..{length - 1} (the time axis "
                             f"of {inputs_name}, length {length}; -1 marks an unused slot)")
                empty = torch.nonzero((pos < 0).all(1)).flatten().tolist()
                if empty:
                    p.append(f"{f}{label}: {_rows_text(empty)} have no position (every slot -1); give each row at "
                             "least one")
                used = pos.clone()
                used[used < 0] = -torch.arange(1, pos.shape[1] + 1).expand_as(pos)[used < 0] - 1
                repeated = torch.nonzero((used.sort(1).values.diff(dim=1) == 0).any(1)).flatten().tolist() \
                    if pos.shape[1] > 1 else []
                if repeated:
                    p.append(f"{f}{label}: {_rows_text(repeated)} name one position twice")
            base_slots = self.positions("base_positions", i) >= 0
            for j in models:
                src_slots = self.positions("source_positions", j) >= 0
                if src_slots.shape == base_slots.shape:
                    mismatch = torch.nonzero((src_slots != base_slots).any(1)).flatten().tolist()
                    if mismatch:
                        p.append(f"source_positions{f' (model {j})' if per_model else ''} and base_positions"
                                 f"{label}: {_rows_text(mismatch)} use different slots (slot k of the source goes "
                                 "to slot k of the base; mark the same slots -1 in both)")
                        break
            scored = scorer.scored(self.field_for("labels", i))
            empty = torch.nonzero(scored == 0).flatten().tolist()
            if empty:
                none = "-100" if scorer.name == "cross_entropy" else "not scored"
                p.append(f"labels{label}: {_rows_text(empty)} score nothing (every label {none}); give each row at "
                         "least one scored label")
        if len(slots) > 1:
            p.append("positions: every model needs the same number of slots P (positions (N, P)); got "
                     + "; ".join(f"P={k}: {', '.join(v)}" for k, v in slots.items()))
        return list(dict.fromkeys(p))

    def validate(self, n_models: int | None = None) -> CounterfactualTensors:
        """Raise one DataError listing every problem (rows and fields named); returns self when valid."""
        p = self.problems(n_models)
        if p:
            raise DataError(p[0] if len(p) == 1 else f"{len(p)} problems in the counterfactual tensors:\n"
                            + "\n".join(f"  - {x}" for x in p))
        return self

    # ------------------------------------------------------------------ subsets
    def subset(self, rows: torch.Tensor) -> CounterfactualTensors:
        rows = torch.as_tensor(rows, dtype=torch.long)

        def take(value):
            if isinstance(value, (list, tuple)):
                return [take(v) for v in value]
            return take_rows(value, rows)

        return CounterfactualTensors(**{f: take(getattr(self, f)) for f in FIELDS}, scorer=self.scorer,
                                     scorer_options=dict(self.scorer_options), variable=self.variable,
                                     info=dict(self.info))

    # ------------------------------------------------------------------ files
    def _flat(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, Any] = {}
        for f in FIELDS:
            value = getattr(self, f)
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            shapes = []
            for i, v in enumerate(items):
                if isinstance(v, dict):
                    shapes.append(sorted(v))
                    tensors.update({f"{f}.{i}.{k}": t for k, t in v.items()})
                else:
                    shapes.append(None)
                    tensors[f"{f}.{i}"] = v
            layout[f] = {"per_model": isinstance(value, (list, tuple)), "dict_keys": shapes}
        scorer = self.scorer
        if isinstance(scorer, Scorer):
            name = scorer.name if scorer.name in SCORERS else f"{type(scorer).__module__}:{type(scorer).__qualname__}"
            options = dict(scorer.options)
        else:
            name, options = scorer, dict(self.scorer_options)
        meta = {"version": 1, "layout": layout, "scorer": name, "scorer_options": options,
                "variable": self.variable, "info": self.info, "rows": len(self)}
        return tensors, meta

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/data.safetensors`` and ``directory/data.json`` (atomically); returns the directory."""
        self.validate()
        directory = Path(directory)
        tensors, meta = self._flat()
        if meta["scorer"] not in SCORERS:  # a user's scorer: it must import back by its name
            try:
                found = import_object(meta["scorer"], "scorer")
            except ConfigError:
                found = None
            if isinstance(self.scorer, Scorer) and found is not type(self.scorer):
                raise ConfigError(f"scorer {meta['scorer']!r} cannot be imported back by that name (a class "
                                  "defined inside a function?); define it at module level, or give "
                                  "scorer='package.module:Name'")
        # one tensor may fill several fields (e.g. the same inputs for two models); safetensors stores each once
        atomic_save_tensors(directory / TENSOR_FILE, {k: v.detach().cpu().clone() for k, v in tensors.items()})
        atomic_write_json(directory / META_FILE, meta, indent=1, sort_keys=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CounterfactualTensors:
        """Read what `save` wrote (DataError naming the file when it is missing or malformed)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        tensor_file, meta_file = directory / TENSOR_FILE, directory / META_FILE
        for path in (tensor_file, meta_file):
            if not path.is_file():
                raise DataError(f"counterfactual tensors {str(directory)!r}: {path.name} is missing; write the "
                                "directory with CounterfactualTensors.save(DIR)")
        try:
            meta = json.loads(meta_file.read_text())
            tensors = load_file(str(tensor_file))
            fields = {}
            for f in FIELDS:
                spec = meta["layout"][f]
                items = []
                for i, keys in enumerate(spec["dict_keys"]):
                    items.append({k: tensors[f"{f}.{i}.{k}"] for k in keys} if keys is not None
                                 else tensors[f"{f}.{i}"])
                fields[f] = items if spec["per_model"] else items[0]
        except Exception as e:  # json, safetensors and key errors alike: the directory is not what save wrote
            raise DataError(f"counterfactual tensors {str(directory)!r} are not readable ({type(e).__name__}: {e}); "
                            "write them again with CounterfactualTensors.save(DIR)") from None
        return cls(**fields, scorer=meta.get("scorer", "cross_entropy"),
                   scorer_options=meta.get("scorer_options", {}), variable=meta.get("variable", "full"),
                   info=meta.get("info", {}))

    def digest(self) -> str:
        """A content hash of every tensor and the scoring (what a run's fingerprint records)."""
        tensors, meta = self._flat()
        h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
        for key in sorted(tensors):
            t = tensors[key].detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]


def is_tensor_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by `CounterfactualTensors.save`."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()
