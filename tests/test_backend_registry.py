"""The backend registry, the dtype table, the shared fired-check, and the import layering of llm_mas.backends."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import llm_mas.backends
from llm_mas.backends import BACKENDS, TorchHookBackend, get_backend, register_backend
from llm_mas.backends.base import Edit, check_edits_fired
from llm_mas.dtypes import DTYPES, WEIGHT_DTYPES, parse_dtype
from llm_mas.errors import ConfigError, InterventionError
from llm_mas.sites import Site, register_site_aliases, registered_site_aliases, resolve_site, site_aliases

BACKENDS_DIR = Path(llm_mas.backends.__file__).parent


# ------------------------------------------------------------------------------------------------ layering
def _imported_names(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (top level and inside functions)."""
    package = "llm_mas.backends"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:  # relative: resolve against llm_mas.backends
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_backend_sources_import_nothing_from_llm():
    files = sorted(BACKENDS_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "base.py", "torch_hooks.py", "nnsight_backend.py",
                                       "tlens_backend.py"}
    for path in files:
        upward = [n for n in _imported_names(path) if n == "llm_mas.llm" or n.startswith("llm_mas.llm.")]
        assert not upward, f"{path.name} imports {upward}"


def test_importing_backends_loads_no_llm_and_no_heavy_library():
    modules = [f"llm_mas.backends.{m.name}" for m in pkgutil.iter_modules([str(BACKENDS_DIR)])]
    assert "llm_mas.backends.nnsight_backend" in modules and "llm_mas.backends.tlens_backend" in modules
    code = ("import sys, importlib, llm_mas.backends\n"
            "eager = [m for m in ('nnsight', 'transformer_lens') if m in sys.modules]\n"
            "assert not eager, f'import llm_mas.backends imported {eager}'\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "upward = sorted(m for m in sys.modules if m == 'llm_mas.llm' or m.startswith('llm_mas.llm.'))\n"
            "assert not upward, upward\n"
            "eager = [m for m in ('nnsight', 'transformer_lens') if m in sys.modules]\n"
            "assert not eager, f'importing the backend modules imported {eager}'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_and_lookup():
    assert list(BACKENDS) == ["torch", "nnsight", "tlens"]
    assert isinstance(get_backend("torch"), TorchHookBackend)
    assert get_backend("torch") is not get_backend("torch")  # a new instance each time
    with pytest.raises(ConfigError, match="unknown backend 'hooks'; valid choices: nnsight, tlens, torch"):
        get_backend("hooks")
    with pytest.raises(TypeError):
        BACKENDS["mine"] = TorchHookBackend  # read-only view


def test_registering_a_duplicate_name_raises_and_changes_nothing():
    before = dict(BACKENDS)
    for name in ("torch", "nnsight", "tlens"):
        with pytest.raises(ConfigError, match=f"backend '{name}' is already registered"):
            register_backend(name, TorchHookBackend)
    assert dict(BACKENDS) == before
    with pytest.raises(ConfigError, match="package.module:ClassName"):
        register_backend("broken", "no_colon_here")
    assert "broken" not in BACKENDS


def test_register_a_new_backend_then_refuse_it_twice():
    class Recording(TorchHookBackend):
        name = "recording"

    try:
        register_backend("recording", Recording)
        assert isinstance(get_backend("recording"), Recording)
        with pytest.raises(ConfigError, match="already registered"):
            register_backend("recording", TorchHookBackend)
        assert isinstance(get_backend("recording"), Recording)
    finally:
        llm_mas.backends._REGISTRY.pop("recording", None)
        llm_mas.backends._FACTS.pop("recording", None)


def test_backend_facts_drive_the_config_checks_not_backend_names():
    """A registered backend that runs a converted copy of the model is refused where tlens is (adapters,
    counterfactual text runs), by its registered facts; the built-ins state theirs on their classes."""
    from types import SimpleNamespace

    from llm_mas.backends import backend_facts
    from llm_mas.problems.counterfactual import counterfactual_problems
    from llm_mas.problems.kinds import HFModelConfig
    from llm_mas.run_config import DataConfig

    assert not backend_facts("torch").converts_model and not backend_facts("nnsight").converts_model
    assert backend_facts("tlens").converts_model
    with pytest.raises(ConfigError, match="'nope'"):
        backend_facts("nope")
    assert dict(get_backend("torch").feed_options) == {"use_cache": False}
    model = torch.nn.Linear(2, 2)
    assert get_backend("torch").prepare(model, None) is model

    class Converting(TorchHookBackend):
        name = "converting"

    try:
        register_backend("converting", Converting, converts_model=True)
        entry = HFModelConfig(name="x", recording="r", backend="converting", adapter="a")
        assert any("adapter: the converting backend needs merged weights" in p for p in entry.problems("models.0"))
        plain = HFModelConfig(name="x", recording="r", backend="torch", adapter="a")
        assert not any("adapter" in p for p in plain.problems("models.0"))
        text_run = counterfactual_problems(SimpleNamespace(
            models=[HFModelConfig(name="x", backend="converting")], data=DataConfig(task="multiobject"),
            variables=["full"], null_subspace=False, intervention="interchange"))
        assert any("models.0.backend: converting runs a converted copy" in p for p in text_run)
    finally:
        llm_mas.backends._REGISTRY.pop("converting", None)
        llm_mas.backends._FACTS.pop("converting", None)


# ------------------------------------------------------------------------------------------------ dtypes
def test_one_dtype_table():
    import llm_mas.llm.loading as loading

    assert DTYPES == ("float32", "bfloat16", "float16", "auto") and WEIGHT_DTYPES == DTYPES[:3]
    assert loading.DTYPES is DTYPES and loading.parse_dtype is parse_dtype
    assert [parse_dtype(d) for d in DTYPES] == [torch.float32, torch.bfloat16, torch.float16, "auto"]
    with pytest.raises(ConfigError, match="unknown dtype 'fp32'; valid choices: auto, bfloat16, float16, float32"):
        parse_dtype("fp32")
    with pytest.raises(ConfigError, match="unknown dtype 'auto'; valid choices: bfloat16, float16, float32"):
        parse_dtype("auto", allow_auto=False)


# ------------------------------------------------------------------------------------------------ fired-check
def _edit(mask: torch.Tensor, fired: int) -> Edit:
    edit = Edit(Site.parse("layer0"), mask, lambda x, which: x)
    edit.fired = fired
    return edit


def test_check_edits_fired_hand_made_cases():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True  # 2 entries
    check_edits_fired([_edit(mask, 2), _edit(torch.zeros(2, 4, dtype=torch.bool), 0)])  # all fired / nothing to do
    with pytest.raises(InterventionError, match=r"edit at layer0:output@given never fired: 'layer0' was not reached"):
        check_edits_fired([_edit(mask, 2), _edit(mask, 0)])
    with pytest.raises(InterventionError, match="fired on 1 of 2 entries; the mask covers positions beyond"):
        check_edits_fired([_edit(mask, 1)])


# ------------------------------------------------------------------------------------------------ aliases
def test_registered_aliases_live_beside_the_model():
    model = torch.nn.Sequential(OrderedDict(encoder=torch.nn.Linear(3, 3), head=torch.nn.Linear(3, 3)))
    assert site_aliases(model) == {} and registered_site_aliases(model) is None
    assert register_site_aliases(model, {"first": "encoder"}) is model
    assert vars(model).keys() == vars(torch.nn.Sequential()).keys()  # nothing was set on the model
    assert site_aliases(model) == {"first": "encoder"}
    assert str(resolve_site(model, "first@all")) == "encoder:output@all"
    assert str(TorchHookBackend().resolve(model, "first:input[0]@1,2")) == "encoder:input[0]@1,2"
    assert registered_site_aliases(torch.nn.Sequential(torch.nn.Linear(3, 3))) is None  # per object
