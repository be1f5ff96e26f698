"""Safe files: atomic writes, one process per directory, content fingerprints, pickle-free loading.

- ``atomic_write_text / atomic_write_bytes / atomic_write_json / atomic_save_tensors``: the data go to a
  temporary file in the same directory, are flushed to disk, then renamed over the target. A process
  killed at any point leaves either the old file or the new one, never an empty or half-written one.
- ``DirectoryLock``: one process per run directory. The lock file names the holder's pid and host; a
  second live process is refused with an error naming that pid; a lock left behind by a dead process (same
  host, pid gone) is taken over.
- ``this_process / process_running / left_by_dead_process``: who owns a lock or a scratch directory, and
  whether that owner died without cleaning up.
- ``file_digest``: a content hash of a file (what a run's fingerprint records for each model's weights).
- ``load_tensors``: tensors from a safetensors file or a ``torch.load(weights_only=True)`` file: nothing
  in a file can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------ owners
def this_process() -> dict[str, Any]:
    """``{"pid": ..., "host": ...}``: what a lock or a scratch directory records of the process owning it."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def process_running(pid: int) -> bool:
    """Whether process `pid` of this host is running (another user's live process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_process(owner: Any) -> bool:
    """Whether `owner` (a `this_process()` record, as read back) names a process of this host, other than
    this one, that is no longer running; anything else (unreadable, another host, alive) is False."""
    me = this_process()
    if not isinstance(owner, dict) or owner.get("host") != me["host"]:
        return False
    pid = owner.get("pid")
    return isinstance(pid, int) and pid > 0 and pid != me["pid"] and not process_running(pid)


# ------------------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **kwargs))


def atomic_save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` of plain containers of tensors and numbers, written atomically (read back with
    ``load_torch_state``, i.e. ``weights_only=True``: the file cannot carry code)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------ safe loading
def load_torch_state(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and containers only.

    A file holding anything else (a pickled object, code) is refused with a DataError naming the file;
    nothing in it runs.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{str(path)!r} is not a plain tensor file ({first}); it may be corrupted or not written "
                        "by llm_mas. Delete it (or the run directory) and run again") from None


# ------------------------------------------------------------------------------------------ reading rows
def jsonl_rows(path: str | Path):
    """(line number, parsed value) of every non-blank line of a JSONL file; a line that is not JSON is a
    DataError naming the file and the line."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {number}: not valid JSON ({e.msg}): {line[:80]!r}") from None


# ------------------------------------------------------------------------------------------ fingerprints
def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex, first 16 characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def tree_digest(paths: list[Path]) -> str:
    """One hash over several files (names and contents), e.g. every weight file of a model directory."""
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.name.encode())
        digest.update(file_digest(p).encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ locking
class DirectoryLock:
    """``with DirectoryLock(run_dir):`` one process at a time per directory.

    The lock file (``.lock``) holds ``{"pid": ..., "host": ...}``; it is created with O_EXCL, so two
    processes cannot both take it. A lock whose holder is a dead process on this host is taken over.
    """

    NAME = ".lock"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / self.NAME
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        me = this_process()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written right now, or garbage: look again
                    holder = {"pid": -1, "host": me["host"]}
                pid, host = int(holder.get("pid", -1)), holder.get("host")
                if pid == me["pid"] and host == me["host"]:
                    raise ConfigError(f"run directory {str(self.directory)!r} is already locked by this process "
                                      f"(pid {pid}); one run per directory at a time") from None
                if (host == me["host"] and pid < 0) or left_by_dead_process(holder):
                    self.path.unlink(missing_ok=True)  # garbage, or left by a dead process: take it over
                    continue
                raise ConfigError(f"run directory {str(self.directory)!r} is in use by process {pid} on {host} "
                                  f"(lock file {str(self.path)!r}); wait for it to finish, stop it, or choose "
                                  "another name") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ConfigError(f"could not lock run directory {str(self.directory)!r}: its lock file keeps changing; "
                          "is another process starting the same run?")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
