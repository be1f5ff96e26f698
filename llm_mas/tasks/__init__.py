"""Numeric tasks, their causal models and counterfactual pair generation.

    from llm_mas.tasks import get_task, TASK_NAMES, SequenceBatch, Task, PairSet, make_pairs
    task = get_task("multiobject")
    base = task.sample(10_000, np.random.default_rng(0))          # N uniform over 1..20
    pairs = make_pairs(task, base, task, base, "count", 10_000, np.random.default_rng(1))

Tasks: multiobject, sameobject, singleobject, modulo, rounding (counting.py) and arithmetic (arithmetic.py).
"""

from __future__ import annotations

from collections.abc import Callable

from llm_mas.errors import ConfigError, choice_error
from llm_mas.tasks.base import BOS, EOS, PAD, SequenceBatch, Task, Vocab
from llm_mas.tasks.pairs import PairSet, build_pairs, make_pairs

# the built-in tasks; `task_names()` lists these and every task registered with `register_task`
TASK_NAMES = ("multiobject", "sameobject", "singleobject", "modulo", "rounding", "arithmetic")


def _builtin(name: str) -> Callable[[], Task]:
    def build() -> Task:
        if name == "arithmetic":
            from llm_mas.tasks.arithmetic import ArithmeticTask  # noqa: PLC0415 (imports counting's helpers)

            return ArithmeticTask()
        from llm_mas.tasks import counting  # noqa: PLC0415

        return getattr(counting, name)()
    return build


_FACTORIES: dict[str, Callable[[], Task]] = {name: _builtin(name) for name in TASK_NAMES}
_CACHE: dict[str, Task] = {}


def register_task(name: str, factory: Callable[[], Task], *, replace: bool = False) -> None:
    """Make ``get_task(name)`` (and every config key that names a task) build ``factory()`` (once).

    Names are case-insensitive. A name already registered is refused unless ``replace=True``.
    """
    key = str(name).strip().lower()
    if not key or not callable(factory):
        raise ConfigError(f"register_task needs a non-empty name and a callable factory, got {name!r}, {factory!r}")
    if key in _FACTORIES and not replace:
        raise ConfigError(f"task {key!r} is already registered; pass replace=True to replace it")
    _FACTORIES[key] = factory
    _CACHE.pop(key, None)


def task_names() -> tuple[str, ...]:
    """Every task ``get_task`` knows: the built-in ones, then those registered."""
    return tuple(_FACTORIES)


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive; see `task_names`); ConfigError listing them otherwise."""
    key = str(name).strip().lower()
    if key not in _FACTORIES:
        raise choice_error("task", name, task_names())
    if key not in _CACHE:
        _CACHE[key] = _FACTORIES[key]()
    return _CACHE[key]


__all__ = [
    "BOS", "EOS", "PAD", "TASK_NAMES", "PairSet", "SequenceBatch", "Task", "Vocab", "build_pairs", "get_task",
    "make_pairs", "register_task", "task_names",
]
