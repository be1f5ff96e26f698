"""Experiment recipes: one module per experiment, run from the repository root as

    python -m recipes.stitching_vs_mas recipes/configs/stitching_vs_mas.yaml
    python -m recipes.clmas | recipes.cross_task | recipes.correlative_vs_causal | recipes.llm_mas_smoke
    python -m recipes.lm_alignment --smoke
    python -m recipes.many_models --smoke
    python -m recipes.toxicity.run --smoke

Recipes orchestrate and the library (``llm_mas``) computes. A recipe imports ``llm_mas`` and
``recipes.common`` (run planning and reuse, claims, tables, plots, the shared command line), never another
recipe; the library never imports ``recipes``. Presets live in ``recipes/configs/`` (first line: the command).
This package is not part of the ``llm_mas`` wheel: it runs from a checkout.
"""
