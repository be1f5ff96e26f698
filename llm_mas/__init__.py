"""llm_mas: Model Alignment Search (MAS) — do two neural networks perform a task the same way?

    import llm_mas
    result = llm_mas.compare(models=["multiobject-gru-s0", "multiobject-gru-s1"], site="hidden", k=32)
    result.matrix(); result.to_dataframe(); result.plot()

    # any torch modules on counterfactual tensors (README: "Your own model")
    data = llm_mas.CounterfactualTensors(base=x_b, source=x_s, base_positions=t, source_positions=t, labels=y)
    result = llm_mas.compare(models=[gru_a, gru_b], data=data, site="rnn", k=1)

Heavy dependencies (torch, nnsight, transformer_lens, peft, datasets) are imported lazily.
"""

__version__ = "0.1.0"

_LAZY = {
    "compare": "llm_mas.api",
    "evaluate": "llm_mas.artifacts",
    "load_task_model": "llm_mas.models.registry",
    "MASResult": "llm_mas.results",
    "MASConfig": "llm_mas.run_config",
    "run_mas": "llm_mas.run:run",
    "get_task": "llm_mas.tasks",
    "register_task": "llm_mas.tasks",
    "CounterfactualTensors": "llm_mas.tasks.tensor_data",
    "Scorer": "llm_mas.tasks.tensor_data",
    "HookPoint": "llm_mas.hooks",
    "register_kind": "llm_mas.problems.kinds",
    "ModelKind": "llm_mas.problems.kinds",
    "register_problem": "llm_mas.problems",
    "stepped": "llm_mas.models.recurrent",
    "RecordedSystem": "llm_mas.recordings",
    "cl_loss": "llm_mas.recordings",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, _, attribute = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)
    raise AttributeError(f"module 'llm_mas' has no attribute {name!r}")


__all__ = sorted(_LAZY)
