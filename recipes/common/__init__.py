"""What the comparison recipes share (``recipes/*.py``); every number they write comes from the library
(``llm_mas.run.run`` / ``MASResult`` records), these modules only decide which runs to execute and
format what came out:

- ``plans``: MAS configs from presets, finished-run reuse / resume / training, planned runs and their rows;
- ``models``: the recipes' task models: shipped names, checkpoint directories or random-weight stand-ins;
- ``claims``: paper claims and their verdicts, thresholds, interval comparisons;
- ``report``: number formatting, CSV, markdown tables, ``summary.md``, run-status lines;
- ``plots``: IIA line and bar charts (matplotlib's object API: no backend or global state is touched);
- ``cli``: the command line every recipe shares (``recipe_front_door``: arguments, presets, overrides,
  ``--smoke`` / ``--only`` / ``--report``, the run directory; ``recipe_main``: that plus a plan of MAS runs).
"""
