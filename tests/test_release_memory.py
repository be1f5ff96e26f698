"""trainer.ReleaseMemory: when freed heap memory goes back to the OS. Driven with a scripted resident-set
trajectory: a step's own working set (retained between steps) must not trigger a release at every step;
creep beyond it must, and so must the periodic release, the start and each validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import llm_mas.trainer as trainer_module
from llm_mas.trainer import ReleaseMemory


class Heap:
    """Resident MiB: `live` plus what freed blocks still hold; a release drops the retained part."""

    def __init__(self, live: float):
        self.live, self.retained, self.releases = live, 0.0, []

    def resident(self):
        return self.live + self.retained

    def release(self):
        self.releases.append(self.step)
        self.retained = 0.0


@pytest.fixture
def heap(monkeypatch):
    h = Heap(live=500.0)
    h.step = 0
    monkeypatch.setattr(trainer_module, "resident_mib", h.resident)
    monkeypatch.setattr(trainer_module, "release_freed_memory", h.release)
    return h


def drive(callback, heap, retained_after_step, steps):
    trainer = SimpleNamespace(step=0)
    callback.on_fit_start(trainer)
    for step in range(1, steps + 1):
        trainer.step = heap.step = step
        heap.retained += retained_after_step(step)
        callback.on_step_end(trainer, None)


def test_a_large_working_set_is_not_released_at_every_step(heap):
    # 15 models: each step frees ~2 GB that the next step reuses; nothing creeps
    def working_set(step):  # the retained amount is the working set, set once per release (no growth)
        return 2000.0 if heap.retained == 0 else 0.0
    drive(ReleaseMemory(every=10, growth_mib=256), heap, working_set, 30)
    assert heap.releases == [0, 10, 20, 30]   # the start and the periodic ones only


def test_creep_beyond_the_working_set_is_released(heap):
    # a 2-model run: 300 MiB working set, then 60 MiB of scattered freed blocks per step
    def creep(step):
        return 300.0 if heap.retained == 0 else 60.0
    drive(ReleaseMemory(every=100, growth_mib=256), heap, creep, 20)
    # after each release: the level is learned at the next step's end (300 retained), and the release
    # comes once 256 MiB more have crept in: 5 steps of 60 (300 > 256)
    assert heap.releases == [0, 6, 12, 18]


def test_validation_releases_and_relearns_the_level(heap):
    callback = ReleaseMemory(every=100, growth_mib=256)
    trainer = SimpleNamespace(step=0)
    callback.on_fit_start(trainer)
    heap.retained, heap.step, trainer.step = 1000.0, 1, 1
    callback.on_step_end(trainer, None)
    assert callback.level == 1500.0 and heap.releases == [0]
    heap.step = 2
    callback.on_validation(trainer, None, [])
    assert heap.releases == [0, 2] and callback.level is None
    heap.retained, heap.step, trainer.step = 100.0, 3, 3
    callback.on_step_end(trainer, None)
    assert callback.level == 600.0 and heap.releases == [0, 2]


def test_no_resident_reading_releases_only_on_schedule(heap, monkeypatch):
    monkeypatch.setattr(trainer_module, "resident_mib", lambda: None)   # platforms without /proc
    drive(ReleaseMemory(every=5, growth_mib=1), heap, lambda step: 1000.0, 12)
    assert heap.releases == [0, 5, 10]
