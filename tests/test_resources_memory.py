"""The one reader of this process's memory (llm_mas.resources), used by the trainer, recipes and benches."""

from __future__ import annotations

import sys

import pytest

from llm_mas.resources import peak_resident_mib, resident_mib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_resident_memory_follows_an_allocation_and_the_peak_bounds_it():
    before = resident_mib()
    block = bytearray(b"\x01" * (160 * 2**20))  # 160 MiB, every page touched
    during = resident_mib()
    assert during - before > 120  # (a little may have been resident already)
    assert peak_resident_mib() >= during - 1
    del block
    assert peak_resident_mib() >= during - 1  # a high-water mark never falls
