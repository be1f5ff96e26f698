"""Formatting a recipe's outputs: numbers, CIs, CSV files, markdown tables, ``summary.md`` and the lines
naming runs that are not finished or were stopped early."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .claims import Claim

SMOKE_NOTE = ("**Smoke run** (2 training steps on a few dozen pairs, possibly random-weight models): the "
              "numbers check the plumbing only; the verdicts below mean nothing.")
# How the trainer's stop reason begins when a STOP file ended a run (llm_mas.trainer).
EARLY_STOP = "stopped early"


def is_number(x: Any) -> bool:
    """A real number, not NaN and not a bool (missing table cells are NaN or absent)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` decimals, None / NaN as –."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(row: dict, key: str = "trial_iia") -> str:
    """``0.930 [0.910, 0.950]``: `row[key]` with its CI (``<key>_lo``, ``<key>_hi``) when it has one."""
    if not is_number(row.get(key)):
        return "–"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if is_number(lo) and is_number(hi):
        return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{row[key]:.3f}"


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    """Rows (dicts) as CSV; the header is the union of keys in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `columns` of `rows` (NaN / missing as –)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_summary(path: str | Path, title: str, command: str, sections: Sequence[str],
                  claims: Sequence[Claim]) -> None:
    """``summary.md``: title, the exact command, free sections (tables, notes) and the claims' verdicts."""
    lines = [f"# {title}", "", f"`{command}`", "", *[s + "\n" for s in sections], "## Paper claims", ""]
    lines += [c.markdown() for c in claims] or ["- (none evaluated)"]
    Path(path).write_text("\n".join(lines) + "\n")


def early_stop_note(rows: Sequence[dict], run_key: str = "run", stopped_key: str = "stopped",
                    best_key: str = "best_step", steps_key: str = "steps") -> str | None:
    """A summary line naming the runs ended early by a STOP file (e.g. a time budget), or None.

    Their numbers come from the best checkpoint so far; a longer run could still improve them."""
    runs = dict.fromkeys(f"{r[run_key]} (best step {r.get(best_key)} of {r.get(steps_key)})" for r in rows
                         if str(r.get(stopped_key) or "").startswith(EARLY_STOP))
    if not runs:
        return None
    return ("Stopped early by a STOP file (time budget); the best checkpoint so far is reported and a longer "
            "run could still improve it: " + ", ".join(runs) + ".")


def run_status_sections(rows: Sequence[dict]) -> list[str]:
    """Summary lines for runs that are not finished (in run order) and runs ended early by a STOP file."""
    not_done = list(dict.fromkeys(f"{r['run']} ({r['status']})" for r in rows
                                  if r["status"] not in ("reused", "trained")))
    out = [f"Not finished ({len(not_done)}, in run order): " + ", ".join(not_done)] if not_done else []
    early = early_stop_note(rows)
    return out + ([early] if early else [])
