"""`MASResult`: the records of one run, as an n×n matrix, a data frame and a plot."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .problems.base import Record


@dataclass
class MASResult:
    """Records: one `llm_mas.problems.Record` per (source, target, variable) (``results.json`` holds their
    ``to_dict()`` forms); ``info``: how training ended (stopped, best_step, steps)."""

    models: list[str]
    variables: list[str]
    records: list[Record]
    run_dir: Path | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        # records given in their results.json form (dicts) become Records
        self.records = [r if isinstance(r, Record) else Record.from_dict(r) for r in self.records]

    def matrix(self, variable: str | None = None, metric: str = "trial_iia") -> np.ndarray:
        """(n, n) array; rows = source, columns = target; NaN where a direction was not evaluated."""
        variable = variable or self.variables[0]
        n = len(self.models)
        out = np.full((n, n), np.nan)
        for r in self.records:
            if r.variable == variable:
                out[r.source_index, r.target_index] = getattr(r, metric)
        return out

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for record in self.records:
            r = record.to_dict()
            row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
            for key in ("trial_iia_ci", "token_iia_ci"):
                if key in r:
                    row[key + "_lo"], row[key + "_hi"] = r[key]
            rows.append(row)
        return pd.DataFrame(rows)

    def table(self, variable: str | None = None, metric: str = "trial_iia") -> str:
        """Plain-text matrix (source rows × target columns)."""
        m = self.matrix(variable, metric)
        names = self.models
        w = max(8, *(len(x) for x in names))
        corner = "source \\ target"
        head = f"{corner:<{w}} " + " ".join(f"{x:>{w}}" for x in names)
        lines = [head]
        for i, name in enumerate(names):
            cells = " ".join(f"{'-':>{w}}" if np.isnan(v) else f"{v:>{w}.3f}" for v in m[i])
            lines.append(f"{name:<{w}} {cells}")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, metric: str = "trial_iia"):
        """Heat map per variable (source rows, target columns), a matplotlib ``Figure``; saved to `path` if
        given. The figure is not registered with pyplot (no backend is chosen or changed): show it in a
        notebook by returning it."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        nv = len(self.variables)
        fig = Figure(figsize=(3.2 + 1.1 * len(self.models) * nv, 1.2 + 1.0 * len(self.models)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, nv, squeeze=False)
        for ax, var in zip(axes[0], self.variables):
            m = self.matrix(var, metric)
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(self.models)), self.models, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(self.models)), self.models, fontsize=8)
            ax.set_xlabel("target")
            ax.set_ylabel("source")
            ax.set_title(f"{metric.replace('_', ' ')}: {var}", fontsize=9)
            for (i, j), v in np.ndenumerate(m):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig

    def save(self, run_dir: str | Path) -> None:
        records = [r.to_dict() for r in self.records]
        Path(run_dir, "results.json").write_text(json.dumps(records, indent=1, sort_keys=True))

    @classmethod
    def load(cls, run_dir: str | Path) -> MASResult:
        run_dir = Path(run_dir)
        records = [Record.from_dict(r) for r in json.loads((run_dir / "results.json").read_text())]
        n = 1 + max(max(r.source_index, r.target_index) for r in records)
        names = [""] * n
        for r in records:
            names[r.source_index] = r.source
            names[r.target_index] = r.target
        variables = list(dict.fromkeys(r.variable for r in records))
        return cls(models=names, variables=variables, records=records, run_dir=run_dir)
