"""Paper claims and what a recipe's measured table says about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .report import fmt_ci, is_number

# "near-perfect" and "comparable" as the recipes test them (stated in every summary that uses them)
NEAR_PERFECT = 0.95
COMPARABLE = 0.05


@dataclass
class Claim:
    """A paper claim and what the measured table says about it (holds: True, False or None = pending)."""

    text: str
    holds: bool | None
    evidence: str

    def markdown(self) -> str:
        verdict = {True: "**holds**", False: "**does not hold**", None: "**pending**"}[self.holds]
        return f"- {self.text} — {verdict}. {self.evidence}"


def all_known(*values: Any) -> bool:
    """Every value is a number (not NaN / None): the claim can be judged."""
    return all(is_number(v) for v in values)


def format_ci_comparison(a: dict, b: dict, key: str = "trial_iia") -> str:
    """``0.930 [0.910, 0.950] > 0.710 [0.680, 0.740] (CIs disjoint)``: two rows' point estimates of `key`
    with their CIs, the order between them, and whether the CIs overlap; ``pending`` when one is missing."""
    if not (is_number(a.get(key)) and is_number(b.get(key))):
        return "pending"
    va, vb = a[key], b[key]
    sign = ">" if va > vb else "<" if va < vb else "="
    disjoint = (is_number(a.get(f"{key}_lo")) and is_number(b.get(f"{key}_hi"))
                and (a[f"{key}_lo"] > b[f"{key}_hi"] or b[f"{key}_lo"] > a[f"{key}_hi"]))
    return f"{fmt_ci(a, key)} {sign} {fmt_ci(b, key)} ({'CIs disjoint' if disjoint else 'CIs overlap'})"
