"""Safe files: atomic writes survive a kill, one process per directory, no code runs from a loaded file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llm_mas.errors import ConfigError, DataError
from llm_mas.files import (
    DirectoryLock,
    atomic_save_tensors,
    atomic_torch_save,
    atomic_write_text,
    file_digest,
    left_by_dead_process,
    load_torch_state,
    this_process,
)


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_failed_write_keeps_the_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "previous: 1\n")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "next: 2\n")
    assert target.read_text() == "previous: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_kill_inside_a_write_leaves_the_previous_file_intact(tmp_path):
    """A process killed (SIGKILL) after writing half of the new data, before the rename: old file intact."""
    target = tmp_path / "alignments.safetensors"
    atomic_save_tensors(target, {"w": torch.arange(4.0)})
    before = target.read_bytes()
    child = textwrap.dedent(f"""
        import os, sys, time, torch
        import llm_mas.files as files
        real_replace = os.replace
        def stall(src, dst):
            print("writing", flush=True)
            time.sleep(60)
        files.os.replace = stall
        files.atomic_save_tensors({str(target)!r}, {{"w": torch.zeros(1000)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == before


def test_lock_refuses_a_second_live_process_and_names_it(tmp_path):
    child = textwrap.dedent(f"""
        import time
        from llm_mas.files import DirectoryLock
        with DirectoryLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by process {proc.pid}"):
            DirectoryLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # the holder died without releasing: its lock is taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid
    with DirectoryLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_an_owner_counts_as_dead_only_on_this_host_with_its_process_gone():
    """left_by_dead_process: True for a finished process of this host; False for this process, a live one,
    another host's, and anything that is not an owner record."""
    me = this_process()
    assert me == {"pid": os.getpid(), "host": me["host"]} and me["host"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        assert left_by_dead_process({"pid": done.pid, "host": me["host"]})
        assert not left_by_dead_process({"pid": live.pid, "host": me["host"]})
        assert not left_by_dead_process(me)
        assert not left_by_dead_process({"pid": done.pid, "host": me["host"] + "-elsewhere"})
        for garbage in (None, [], {}, {"host": me["host"]}, {"pid": "x", "host": me["host"]},
                        {"pid": -1, "host": me["host"]}, {"pid": 0, "host": me["host"]}):
            assert not left_by_dead_process(garbage), garbage
    finally:
        live.kill()
        live.wait()


def test_lock_is_not_reentrant_within_one_process(tmp_path):
    with DirectoryLock(tmp_path), pytest.raises(ConfigError, match="already locked by this process"):
        DirectoryLock(tmp_path).acquire()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickle_payload_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "checkpoint.pt"
    torch.save({"step": 3, "payload": _Payload(marker)}, planted)
    assert not marker.exists()
    with pytest.raises(DataError, match="not a plain tensor file"):
        load_torch_state(planted)
    assert not marker.exists()


def test_plain_state_round_trips(tmp_path):
    state = {"step": 3, "history": [{"loss": 0.5}], "w": torch.ones(2, 2), "best": None, "t": (1, 2)}
    atomic_torch_save(tmp_path / "state.pt", state)
    back = load_torch_state(tmp_path / "state.pt")
    assert back["step"] == 3 and back["history"] == [{"loss": 0.5}] and torch.equal(back["w"], torch.ones(2, 2))


def test_file_digest_changes_with_one_byte(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 100)
    first = file_digest(path)
    path.write_bytes(b"a" * 99 + b"b")
    assert file_digest(path) != first and len(first) == 16
