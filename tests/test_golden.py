"""Every preset kind reproduces its recorded golden results bit for bit (tests/golden/record.py).

A small seeded run per kind (indywise, stepwise, DAS, stitch, linear stitch, CLMAS, three models, variables
with a null subspace on a GRU and a Transformer, tiny LLMs): every evaluation record, the training history
and a hash of every alignment tensor must equal what was recorded before the core was restructured.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import record  # noqa: E402

GOLDEN = json.loads(record.GOLDEN.read_text())


def _same(a, b, path=""):
    """Exact equality of nested JSON values (NaN equals NaN); returns the first difference or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            d = _same(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _same(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("case", record.all_cases())
def test_golden_run(case, tmp_path):
    got = record.run_case(case, tmp_path)
    diff = _same(GOLDEN[case], json.loads(json.dumps(got)), case)
    assert diff is None, diff
