"""The learning-rate schedule shared by model training (``llm_mas.models.training``) and the tiny LM
trainer (``llm_mas.llm.train_lm``): linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The factor on the base learning rate at (0-based) `step`.

    Steps 0 .. warmup−1 rise linearly to 1 ((step + 1) / warmup); then a half cosine falls from 1 to
    `min_ratio` at `steps` and stays there after it.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
