"""The backend protocol, the `Edit` value and the helpers every backend shares.

Shared helpers: `edit_entry_index` / `apply_edit_to_chunk` (apply an edit to a chunk of latents),
`check_edits_fired` (every edit must have fired on every entry of its mask: no silent no-op),
`pick_latent` / `replace_latent` / `as_3d` (find the (B, T, d) tensor in a module's output or inputs) and
`model_output_logits`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import InterventionError, SiteError
from ..sites import Site

# fn(latents (n, d), which (n,)) -> new latents (n, d).
# `which` indexes the edited entries in row-major order of `mask` (0 .. mask.sum()-1), so a caller can
# prepare per-entry data (e.g. source latents) once and the hook picks the rows it is handed.
EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Edit:
    """Replace the latents at ``site`` where ``mask`` (B, T) is True by ``fn(latents, which)``."""

    site: Site
    mask: torch.Tensor  # (B, T) bool
    fn: EditFn
    fired: int = field(default=0, init=False)  # entries edited so far (checked after the run)

    @property
    def n_entries(self) -> int:
        return int(self.mask.sum())


def edit_entry_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) long: the entry number of every True of `mask` in row-major order, -1 elsewhere."""
    flat = mask.reshape(-1).long()
    idx = torch.cumsum(flat, 0) - 1
    return torch.where(flat.bool(), idx, torch.full_like(idx, -1)).view_as(mask)


def apply_edit_to_chunk(edit: Edit, x: torch.Tensor, positions: torch.Tensor | None,
                        entry_index: torch.Tensor) -> torch.Tensor:
    """Apply `edit` to a chunk x (B, T_chunk, d) covering absolute `positions` (T_chunk,).

    Returns a new tensor (never edits in place: the original may be needed by autograd).
    """
    B, Tc = x.shape[0], x.shape[1]
    if B != edit.mask.shape[0]:
        raise InterventionError(f"edit at {edit.site} has batch {edit.mask.shape[0]} but the latent has batch {B}")
    if positions is None:
        if Tc != edit.mask.shape[1]:
            raise InterventionError(
                f"edit at {edit.site}: latent covers {Tc} positions but the edit mask has {edit.mask.shape[1]}; "
                "the module does not report positions, so the mask width must equal the sequence length")
        positions = torch.arange(Tc, device=x.device)
    in_range = positions < edit.mask.shape[1]
    if not bool(in_range.all()):
        positions = positions[in_range]
        if positions.numel() == 0:
            return x
    sub = edit.mask[:, positions]  # (B, Tc')
    if not bool(sub.any()):
        return x
    rows, cols = sub.nonzero(as_tuple=True)
    which = entry_index[rows, positions[cols]]
    new_vals = edit.fn(x[rows, cols], which)  # (n, d)
    if new_vals.shape[-1] != x.shape[-1]:
        raise InterventionError(
            f"edit at {edit.site} returned width {new_vals.shape[-1]} but the latent has width {x.shape[-1]}")
    edit.fired += rows.numel()
    out = x.clone()
    out[rows, cols] = new_vals.to(out.dtype)
    return out


def check_edits_fired(edits: Sequence[Edit]) -> None:
    """Raise InterventionError unless every edit fired on every entry of its mask (call after the run)."""
    for edit in edits:
        n = edit.n_entries
        if edit.fired == 0 and n > 0:
            raise InterventionError(
                f"the edit at {edit.site} never fired: {edit.site.module!r} was not reached during the forward "
                "pass (check the site path and that the model's forward reaches it)")
        if edit.fired != n:
            raise InterventionError(
                f"the edit at {edit.site} fired on {edit.fired} of {n} entries; the mask covers positions beyond "
                "the sequence length, or the module ran on fewer positions than the mask covers")


def pick_latent(value: Any, index: int | None, site: Site) -> torch.Tensor:
    """The tensor at ``site`` in a module's output (or positional inputs): ``value`` itself or ``value[index]``."""
    if index is None:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            raise SiteError(f"site {site} returns a tuple; add a tuple index, e.g. '{site.module}:{site.io}[0]'")
        raise SiteError(f"site {site} does not hold a tensor (got {type(value).__name__})")
    if not isinstance(value, (tuple, list)) or index >= len(value):
        raise SiteError(f"site {site}: tuple index [{index}] does not exist in {type(value).__name__}")
    return value[index]


def replace_latent(value: Any, index: int | None, new: torch.Tensor) -> Any:
    """``value`` with the tensor `pick_latent` found replaced by ``new`` (a new tuple/list; nothing in place)."""
    if index is None:
        return new
    items = list(value)
    items[index] = new
    return type(value)(items) if isinstance(value, tuple) else items


def as_3d(x: torch.Tensor, site: Site) -> tuple[torch.Tensor, bool]:
    """(x as (B, T, d), whether a step axis was added to a (B, d) latent)."""
    if x.dim() == 3:
        return x, False
    if x.dim() == 2:  # (B, d): one step -> (B, 1, d)
        return x.unsqueeze(1), True
    raise SiteError(f"site {site} holds a tensor of shape {tuple(x.shape)}; expected (B, T, d) or (B, d)")


def model_output_logits(out: Any) -> torch.Tensor:
    """The logits (B, T, V) in a model's output: the tensor itself, ``.logits`` or the first tuple item."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InterventionError(f"cannot find logits in a model output of type {type(out).__name__}")


class Backend(Protocol):
    """What the trainer and the recipes need from a model-access layer."""

    name: str
    # keyword arguments every forward of an HF model through this backend takes (e.g. no KV cache)
    feed_options: Mapping[str, Any]

    def prepare(self, hf_model: Any, tokenizer: Any) -> Any:
        """The model this backend runs for a loaded HF model (the model itself, or a converted copy)."""

    def resolve(self, model: Any, site: Site | str) -> Site:
        """Resolve aliases and check that the site exists (SiteError listing close names if not)."""

    def collect(self, model: Any, inputs: Mapping[str, torch.Tensor], sites: Sequence[Site | str],
                ) -> dict[str, torch.Tensor]:
        """Run the model once; return {str(site): latents (B, T, d)} for every site."""

    def patch(self, model: Any, inputs: Mapping[str, torch.Tensor], edits: Sequence[Edit]) -> Any:
        """Run the model with `edits` applied inside the forward pass; return its logits (B, T, V).

        Raises InterventionError if any edit did not fire on every entry of its mask.
        """
