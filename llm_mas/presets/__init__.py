"""Shipped presets of ``llm-mas mas`` and ``llm-mas similarity``: the ``*.yaml`` files of this package.

    llm-mas list-presets                                   # names, commands, one-line descriptions
    llm-mas mas gru_gru_hidden train.lr=2e-3               # a preset by name ...
    llm-mas mas my_config.yaml                             # ... or any YAML file

    from llm_mas.presets import list_presets, resolve_preset
    resolve_preset("gru_gru_hidden")        # Path of the shipped YAML (a file path that exists wins)

The first line of each preset is the command that runs it; the comment lines after it say what it does.
Recipe configurations (``recipes/configs/*.yaml``) are not presets: they configure recipe scripts.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, closest
from ..resources import package_path

SUFFIXES = (".yaml", ".yml")


def presets_dir() -> Path:
    """The directory holding the shipped presets."""
    return package_path("presets")


def list_presets() -> list[str]:
    """Names of the shipped presets (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in presets_dir().glob("*.yaml"))


def resolve_preset(name_or_path: str | Path) -> Path:
    """The YAML file of a preset: `name_or_path` itself when it is an existing file, else the shipped preset
    of that name (``gru_gru_hidden`` or ``gru_gru_hidden.yaml``).

    Raises ConfigError naming the closest shipped presets when neither exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {str(path)!r} is a directory; pass a preset YAML file or a preset name "
                          "(see `llm-mas list-presets`)")
    text = str(name_or_path)
    name = path.stem if path.suffix in SUFFIXES else path.name
    names = list_presets()
    if path.parent == Path(".") and name in names:
        return presets_dir() / f"{name}.yaml"
    guesses = ", ".join(closest(name, names, n=3))
    raise ConfigError(f"config {text!r} is neither an existing file nor a shipped preset name; did you mean "
                      f"{guesses}? `llm-mas list-presets` lists all {len(names)} presets")


def preset_command(name: str) -> str:
    """``llm-mas similarity`` or ``llm-mas mas``: the command a shipped preset configures (its first line)."""
    first_line = preset_summary(name)[0]
    return "llm-mas similarity" if first_line.startswith("llm-mas similarity") else "llm-mas mas"


def preset_summary(name: str) -> tuple[str, str]:
    """(command that runs it, first line of its description) of a shipped preset, from its leading comments."""
    lines = resolve_preset(name).read_text(encoding="utf-8").splitlines()
    comments = []
    for line in lines:
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("#").strip())
    command = comments[0] if comments else ""
    description = next((c for c in comments[1:] if c), "")
    return command, description
