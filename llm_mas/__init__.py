"""llm_mas: Model Alignment Search (MAS) — do two neural networks perform a task the same way?

Heavy dependencies (nnsight, transformer_lens, peft, datasets) are imported lazily.
"""

__version__ = "0.1.0"
