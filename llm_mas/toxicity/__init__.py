"""The toxicity case study (docs/method.md §15): data loaders and the fine-tuner that makes toxic / nontoxic
variants of a causal LM.

- ``llm_mas.toxicity.data``: Jigsaw, HH-RLHF and ToxicChat from the hub or local files, labelled,
  balanced, shuffled and cut into disjoint splits (``toxicity_corpus``).
- ``llm_mas.toxicity.finetune``: LoRA (default) or full fine-tuning, resumable (``run_finetune``;
  CLI ``llm-mas finetune``).

Both modules import their heavy dependencies (datasets, torch, transformers, peft, accelerate) lazily.
"""

from .data import MODES, SOURCES, ToxicityCorpus, load_examples, toxicity_corpus

__all__ = ["MODES", "SOURCES", "ToxicityCorpus", "load_examples", "toxicity_corpus"]
