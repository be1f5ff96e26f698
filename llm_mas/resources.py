"""Files shipped inside the package (found through ``importlib.resources``, so a wheel works without the
repository checkout):

    llm_mas/data/models/       task-model checkpoints + manifest.json   (llm_mas.models.registry)
    llm_mas/data/toxicity/     the offline toxicity sample             (llm_mas.toxicity.data)
    llm_mas/presets/*.yaml     `llm-mas mas` / `llm-mas similarity` presets   (llm_mas.presets)

In a source checkout (editable install) these are the files of the working tree, so a developer who adds
a checkpoint or a preset there ships it with the next wheel.
"""

from __future__ import annotations

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
