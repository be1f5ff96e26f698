"""One exception family. Every message names the bad value and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MASError(Exception):
    """Base class of every error llm_mas raises on purpose."""


class ConfigError(MASError, ValueError):
    """A configuration value or key is invalid (all problems are listed at once)."""

    def __init__(self, problems: str | Iterable[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        msg = self.problems[0] if len(self.problems) == 1 else (
            f"{len(self.problems)} configuration problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )
        super().__init__(msg)


class SiteError(MASError, KeyError):
    """A site (module path / hook point) does not exist or does not fit the latent."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InterventionError(MASError, RuntimeError):
    """An intervention could not be applied (never fired, wrong width, wrong positions)."""


class DataError(MASError, ValueError):
    """Input data are missing, malformed or stale."""


class NumericalError(MASError, ArithmeticError):
    """Training produced a non-finite loss or gradient (names the step and the directions)."""


class HubUnavailableError(MASError, OSError):
    """A model or dataset was requested from the hub, which cannot be reached."""


def closest(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """The valid names closest to `name` (for 'did you mean' messages)."""
    valid = list(valid)
    found = difflib.get_close_matches(name, valid, n=n, cutoff=0.3)
    return found or valid[:n]


def choice_error(kind: str, value: object, valid: Iterable[str]) -> ConfigError:
    """`unknown <kind> 'x'; valid: a, b, c` (the one message format for bad choices)."""
    valid = sorted(valid)
    return ConfigError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")
