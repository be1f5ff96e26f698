"""Task models (GRU / LSTM / Transformer), their training, and the shipped checkpoints.

    from llm_mas.models import build_task_model, load_task_model
    model = load_task_model("multiobject-gru-s0")          # eval mode, frozen
"""

from __future__ import annotations

from .task_models import (
    ARCHS,
    DEFAULTS,
    GRUTaskModel,
    LSTMTaskModel,
    TaskModel,
    TransformerTaskModel,
    build_task_model,
    count_parameters,
)


def load_task_model(name_or_path, device="cpu"):
    """A shipped checkpoint by name, or a training run directory (see ``llm_mas.models.registry``)."""
    from .registry import load_task_model as _load

    return _load(name_or_path, device=device)


__all__ = ["ARCHS", "DEFAULTS", "GRUTaskModel", "LSTMTaskModel", "TaskModel", "TransformerTaskModel",
           "build_task_model", "count_parameters", "load_task_model"]
