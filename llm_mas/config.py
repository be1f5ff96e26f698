"""Typed configuration: dataclasses hold every default, YAML files are presets, the CLI adds
``key.sub=value`` overrides. Unknown keys and bad values are collected and reported all at once
(one ``ConfigError``) before anything heavy loads.

    cfg = load_config(MASConfig, resolve_preset("gru_gru_hidden"), ["train.lr=2e-3", "models.1.site=embeddings"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError, closest

T = TypeVar("T")


# ------------------------------------------------------------------ building dataclasses from dicts
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check/convert `value` to type `tp`; append a problem (and return value) on failure."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    arms = getattr(tp, "__config_arms__", None)
    if callable(arms) and not isinstance(tp, type):  # a registry of dataclasses told apart by `kind`
        return _coerce_kinds(value, arms(), path, problems)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, path, problems)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
            return value
        return _build(tp, value, path, problems)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
                return value
            return tuple(_coerce(v, a, f"{path}.{i}", problems) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}.{i}", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return value
        args = get_args(tp)
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        try:
            number = float(value)
        except ValueError:
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        if not math.isfinite(number):
            problems.append(f"{path}: {value!r} is not a finite number; give a finite value (e.g. 1e-3)")
            return value
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _coerce_union(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """The first arm of a union that `value` fits; a union of dataclasses with a ``kind`` field is told apart
    by the mapping's ``kind`` (the first arm's when it gives none)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    kinds = _discriminated(args)
    if kinds:  # a union of dataclasses told apart by their `kind` field
        return _coerce_kinds(value, kinds, path, problems)
    errs: list[str] = []
    for arg in args:
        if arg is type(None):
            continue
        trial: list[str] = []
        out = _coerce(value, arg, path, trial)
        if not trial:
            return out
        errs.extend(trial)
    problems.append(errs[0] if len(errs) == 1 else f"{path}: {value!r} does not fit {_type_name(tp)}")
    return value


def _coerce_kinds(value: Any, kinds: dict[str, type], path: str, problems: list[str]) -> Any:
    """Build the dataclass of the mapping's ``kind`` (the first of `kinds` when it gives none)."""
    if isinstance(value, tuple(kinds.values())):
        return value
    if not isinstance(value, dict):
        hint = ""
        if isinstance(value, str) and all("name" in typing.get_type_hints(a) for a in kinds.values()):
            hint = f"; give mappings, e.g. {{name: {value}}}"
        problems.append(f"{path}: expected a mapping, got {value!r}{hint}")
        return value
    kind = value.get("kind", next(iter(kinds)))
    if kind not in kinds:
        problems.append(f"{path + '.' if path else ''}kind: {kind!r} is not one of "
                        f"{', '.join(map(repr, kinds))}")
        return value
    return _build(kinds[kind], value, path, problems)


def _discriminated(args: tuple) -> dict[str, type] | None:
    """{kind: dataclass} when every arm of a union is a dataclass with a ``kind: Literal[...]`` field (the
    first arm is the default when a mapping gives no kind); None otherwise."""
    arms = [a for a in args if a is not type(None)]
    if len(arms) < 2 or not all(dataclasses.is_dataclass(a) for a in arms):
        return None
    kinds = {}
    for arm in arms:
        kind = typing.get_type_hints(arm).get("kind")
        if get_origin(kind) is not Literal:
            return None
        kinds.update({value: arm for value in get_args(kind)})
    return kinds


def _build(cls: type[T], data: dict, path: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    n_before = len(problems)
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            problems.append(f"unknown key {where!r}; valid keys here: {', '.join(closest(key, fields)) or '(none)'}"
                            f" (all: {', '.join(fields)})")
            continue
        kwargs[key] = _coerce(value, hints[key], where, problems)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    for name in missing:
        problems.append(f"missing required key {(path + '.' if path else '') + name!r}")
    if missing:
        return None  # type: ignore[return-value]
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        problems.append(f"{path or cls.__name__}: {e}")
        return None  # type: ignore[return-value]
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            found = validate() or []
        except TypeError:
            if len(problems) == n_before:
                raise
            found = []  # a value of the wrong type, already reported above, tripped a range check
        for p in found:
            problems.append(f"{path + ': ' if path else ''}{p}")
    return obj


def from_dict(cls: type[T], data: dict) -> T:
    """Build and validate a config dataclass (or a union of them told apart by ``kind``); every problem is
    reported at once."""
    problems: list[str] = []
    if dataclasses.is_dataclass(cls):
        obj = _build(cls, data or {}, "", problems)
    else:
        obj = _coerce(data or {}, cls, "", problems)
    if problems:
        raise ConfigError(problems)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for YAML). Fields marked ``metadata={"runtime": True}`` (Python objects a
    run was handed, e.g. an ``nn.Module``) are left out: a run's fingerprint digests them instead."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("runtime")}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------ overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.lr=2e-3)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-3" as a string; numbers in scientific notation are what users mean
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.lower() not in ("e",) else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict (list items addressed by index)."""
    problems = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    problems.append(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a valid list index "
                                    f"(the list has {len(node)} items)")
                    node = None
                    break
                node = node[int(k)]
            else:
                if k not in node or node[k] is None:
                    node[k] = {}
                node = node[k]
        if node is None:
            continue
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                problems.append(f"override {text!r}: {last!r} is not a valid list index")
                continue
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            problems.append(f"override {text!r}: {'.'.join(keys[:-1])} is not a mapping")
    if problems:
        raise ConfigError(problems)
    return data


def _fix_scientific(data: Any) -> Any:
    """PyYAML reads 1e-3 as a string (YAML 1.1); turn such strings into floats."""
    if isinstance(data, dict):
        return {k: _fix_scientific(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_scientific(v) for v in data]
    if isinstance(data, str):
        try:
            if any(c in data for c in "eE") and data.replace("e", "").replace("E", "").replace("-", "").replace(
                    "+", "").replace(".", "").isdigit():
                return float(data)
        except ValueError:
            return data
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file (e.g. {str(path / 'config.yaml')!r}) "
                          "or a preset name (`llm-mas list-presets`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text (YAML) file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return _fix_scientific(data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict | None = None) -> T:
    """Preset (YAML) + overrides -> validated config; all problems at once."""
    data = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def config_text(obj: Any, header: str | None = None) -> str:
    """The config as YAML text, headed by ``# header`` when given."""
    return (f"# {header}\n" if header else "") + yaml.safe_dump(to_dict(obj), sort_keys=False)


def save_config(obj: Any, path: str | Path, header: str | None = None) -> None:
    Path(path).write_text(config_text(obj, header))
