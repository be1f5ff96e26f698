"""llm_mas: Model Alignment Search (MAS) — do two neural networks perform a task the same way?

    import llm_mas
    result = llm_mas.compare(models=["multiobject-gru-s0", "multiobject-gru-s1"], site="hidden", k=32)
    result.matrix(); result.to_dataframe(); result.plot()

Heavy dependencies (torch, nnsight, transformer_lens, peft, datasets) are imported lazily.
"""

__version__ = "0.1.0"

_LAZY = {
    "compare": "llm_mas.api",
    "load_task_model": "llm_mas.models.registry",
    "MASResult": "llm_mas.results",
    "MASConfig": "llm_mas.mas",
    "run_mas": "llm_mas.mas",
    "get_task": "llm_mas.tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm_mas' has no attribute {name!r}")


__all__ = sorted(_LAZY)
