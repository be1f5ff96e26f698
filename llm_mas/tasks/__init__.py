"""Numeric tasks, their causal models and counterfactual pair generation.

    from llm_mas.tasks import get_task, TASK_NAMES, SequenceBatch, Task, PairSet, make_pairs
    task = get_task("multiobject")
    base = task.sample(10_000, np.random.default_rng(0))          # N uniform over 1..20
    pairs = make_pairs(task, base, task, base, "count", 10_000, np.random.default_rng(1))

Tasks: multiobject, sameobject, singleobject, modulo, rounding (counting.py) and arithmetic (arithmetic.py).
"""

from __future__ import annotations

from llm_mas.errors import choice_error
from llm_mas.tasks.base import BOS, EOS, PAD, SequenceBatch, Task, Vocab
from llm_mas.tasks.pairs import PairSet, build_pairs, make_pairs

TASK_NAMES = ("multiobject", "sameobject", "singleobject", "modulo", "rounding", "arithmetic")

_CACHE: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task called `name` (one of TASK_NAMES, case-insensitive); ConfigError listing them otherwise."""
    key = str(name).strip().lower()
    if key not in TASK_NAMES:
        raise choice_error("task", name, TASK_NAMES)
    if key not in _CACHE:
        if key == "arithmetic":
            from llm_mas.tasks.arithmetic import ArithmeticTask

            _CACHE[key] = ArithmeticTask()
        else:
            from llm_mas.tasks import counting

            _CACHE[key] = getattr(counting, key)()
    return _CACHE[key]


__all__ = [
    "BOS", "EOS", "PAD", "TASK_NAMES", "PairSet", "SequenceBatch", "Task", "Vocab", "build_pairs", "get_task",
    "make_pairs",
]
