"""Where a latent lives: `Site` and its one canonical string form.

    "hook_layers.0:output@given"      module path, input/output, positions
    "model.layers.6:output[0]@given"  with a tuple index into the module's output
    "embeddings" / "hidden"           aliases a model resolves to a path (see `resolve_site`)

Positions: ``given`` (per-example positions supplied with the batch: the default),
``all`` (every position) or an explicit comma list such as ``0,3,5``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_SITE_RE = re.compile(
    r"^(?P<module>[A-Za-z_][\w.\-]*)"
    r"(?::(?P<io>input|output))?"
    r"(?:\[(?P<index>\d+)\])?"
    r"(?:@(?P<positions>given|all|\d+(?:,\d+)*))?$"
)


@dataclass(frozen=True)
class Site:
    """A latent location inside one model.

    module:    dotted module path (``model.get_submodule`` form) or a model-specific alias.
    io:        read/write the module's ``output`` (default) or its first positional ``input``.
    index:     index into a tuple output (None: the output is the tensor itself).
    positions: ``given`` | ``all`` | comma-separated integers.
    """

    module: str
    io: str = "output"
    index: int | None = None
    positions: str = "given"

    def __post_init__(self) -> None:
        if self.io not in ("input", "output"):
            raise ConfigError(f"site io {self.io!r} must be 'input' or 'output'")
        if not re.fullmatch(r"given|all|\d+(?:,\d+)*", self.positions):
            raise ConfigError(
                f"site positions {self.positions!r} must be 'given', 'all' or a comma list like '0,3,5'"
            )

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse the canonical string form (the inverse of ``str(site)``)."""
        if isinstance(text, Site):
            return text
        m = _SITE_RE.match(text.strip())
        if not m:
            raise ConfigError(
                f"cannot parse site {text!r}; expected 'module.path[:input|:output][[i]][@given|@all|@0,3]', "
                "e.g. 'model.layers.6:output@given' or an alias like 'embeddings'"
            )
        idx = m.group("index")
        return cls(
            module=m.group("module"),
            io=m.group("io") or "output",
            index=int(idx) if idx is not None else None,
            positions=m.group("positions") or "given",
        )

    def __str__(self) -> str:
        s = f"{self.module}:{self.io}"
        if self.index is not None:
            s += f"[{self.index}]"
        return s + f"@{self.positions}"

    def with_module(self, module: str) -> Site:
        return Site(module=module, io=self.io, index=self.index, positions=self.positions)

    def explicit_positions(self) -> list[int] | None:
        """The integer positions of an explicit position list, else None."""
        if self.positions in ("given", "all"):
            return None
        return [int(p) for p in self.positions.split(",")]


def resolve_site(model, site: str | Site) -> Site:
    """Resolve aliases through the model's ``site_aliases()`` (if it has one)."""
    site = Site.parse(site)
    aliases = model.site_aliases() if hasattr(model, "site_aliases") else {}
    if site.module in aliases:
        target = Site.parse(aliases[site.module])
        return Site(target.module, site.io if site.io != "output" else target.io,
                    site.index if site.index is not None else target.index, site.positions)
    return site
