"""Files shipped inside the package (found through ``importlib.resources``, so a wheel works without the
repository checkout):

    llm_mas/data/models/       task-model checkpoints + manifest.json   (llm_mas.models.registry)
    llm_mas/data/toxicity/     the offline toxicity sample             (llm_mas.toxicity.data)
    llm_mas/presets/*.yaml     `llm-mas mas` / `llm-mas similarity` presets   (llm_mas.presets)

In a source checkout (editable install) these are the files of the working tree, so a developer who adds
a checkpoint or a preset there ships it with the next wheel.

Also the one place that reads this process's memory (``resident_mib``, ``peak_resident_mib``): the trainer,
the recipes and the benches all report it the same way.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from .errors import DataError


def package_path(*parts: str) -> Path:
    """The file-system path of ``llm_mas/<parts...>`` inside the installed package.

    Raises DataError when the package is not installed as plain files (e.g. imported from a zip archive),
    where shipped files have no path of their own.
    """
    resource = files("llm_mas").joinpath(*parts)
    if not isinstance(resource, Path):
        raise DataError(f"llm_mas is imported from {files('llm_mas')!s}, not a directory, so the shipped file "
                        f"{'/'.join(parts)!r} has no path; install llm_mas as plain files (pip install llm_mas)")
    return resource


def resident_mib() -> float | None:
    """This process's resident set now (MiB), from /proc; None where that is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_resident_mib() -> float | None:
    """This process's peak resident set so far (MiB, ``getrusage`` high-water mark); None where unavailable."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024  # macOS: bytes; Linux: KiB
