"""Learning-rate schedules, as factors on a base rate at a (0-based) step: one place for every trainer
(task models ``llm_mas.models.training``, the tiny LMs ``llm_mas.llm.train_lm``,
LoRA fine-tuning ``llm_mas.toxicity.finetune`` and the MAS trainer's ``train.lr_schedule``)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The factor on the base learning rate at (0-based) `step`.

    Steps 0 .. warmup−1 rise linearly to 1 ((step + 1) / warmup); then a half cosine falls from 1 to
    `min_ratio` at `steps` and stays there after it.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_linear(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Factor of step: linear warm-up from 0 ((step + 1) / (warmup_steps + 1)), then linear decay to 0 at
    ``total_steps`` (Hugging Face's linear schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1) if warmup_steps else 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor
