"""Recurrent state at a step, for any ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` inside a user's module.

A forward hook on an ``nn.GRU`` sees its whole output sequence only after the recurrence has run, so an
edit there would change what the head reads at that step but not the steps after it. `SteppedRNN` wraps
the RNN (sharing its parameters: same outputs) and calls a `HookPoint` (``.hook``) on the top layer's
state at every step, with the steps' absolute positions. Where a patching backend announces an edit
(``HookPoint.edit_steps``) it runs the fused kernel up to that step, lets the hook replace the state, and
continues the recurrence from the replaced state: the edit reaches every later step, as in the shipped
task models.

    view, site = stepped_site(model, "rnn")   # site "rnn" of an nn.GRU -> "rnn.hook" of the view
    # `view` runs like `model` (same parameters; `model` itself is not changed)

A site naming an RNN module is turned into its hook this way automatically by a run. A user's own loop
(``nn.GRUCell`` per step) gets the same behaviour by calling a `HookPoint` on its state each step,
``h = self.hook(h[:, None], torch.tensor([t]))[:, 0]``, and continuing from what the hook returns.
LSTM: the hook sees (and an edit replaces) ``h``; the cell state ``c`` is kept. Bidirectional RNNs have
no single state at a step and are refused.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import SiteError
from ..hooks import HookPoint
from ..sites import Site


class SteppedRNN(nn.Module):
    """An ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (its parameters shared) whose top-layer state at every step
    passes through ``self.hook`` (module docstring)."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        if rnn.bidirectional:
            raise SiteError(f"a bidirectional {type(rnn).__name__} has no single recurrent state at a step; "
                            "choose a site after it (a module reading its output)")
        self.rnn = rnn
        self.hook = HookPoint()

    def forward(self, input: torch.Tensor, hx=None):
        rnn = self.rnn
        unbatched = input.dim() == 2
        x = input.unsqueeze(0 if rnn.batch_first else 1) if unbatched else input
        x = x if rnn.batch_first else x.transpose(0, 1)                        # (B, T, n_in)
        if unbatched and hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        T = x.shape[1]
        breaks = self.hook.steps_to_break(T)
        watched = bool(self.hook._forward_hooks or self.hook._forward_pre_hooks)
        if breaks is None and not watched:
            out, h = self._fused(x, hx)
        else:
            stops = (torch.nonzero(breaks).flatten().tolist() if breaks is not None else [])
            stops = [s + 1 for s in stops if s < T] + [T]
            outs, h, start = [], hx, 0
            for stop in dict.fromkeys(stops):
                if stop <= start:
                    continue
                seg, h = self._fused(x[:, start:stop], h)                         # (B, S, H)
                seg = self.hook(seg, torch.arange(start, stop, device=x.device))
                h = self._replace_top(h, seg[:, -1])                               # the recurrence continues from it
                outs.append(seg)
                start = stop
            out = torch.cat(outs, 1)
        out = out if rnn.batch_first else out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if rnn.batch_first else 1)
            h = tuple(t.squeeze(1) for t in h) if isinstance(h, tuple) else h.squeeze(1)
        return out, h

    def _fused(self, x: torch.Tensor, hx):
        rnn = self.rnn
        if rnn.batch_first:
            return rnn(x, hx)
        out, h = rnn(x.transpose(0, 1), hx)
        return out.transpose(0, 1), h

    @staticmethod
    def _replace_top(h, top: torch.Tensor):
        if isinstance(h, tuple):  # LSTM (h, c): the hook edits h
            hn = h[0].clone()
            hn[-1] = top
            return hn, h[1]
        hn = h.clone()
        hn[-1] = top
        return hn


def stepped(model: nn.Module, paths: set[str] | None = None) -> nn.Module:
    """A view of ``model`` whose RNN modules (those at ``paths``; None: every one) are `SteppedRNN`s.

    Modules on the way to a replaced RNN are shallow copies; every parameter and buffer is shared and
    ``model`` itself is not changed. Returns ``model`` when nothing is replaced."""

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if isinstance(module, nn.RNNBase) and (paths is None or prefix in paths):
            return SteppedRNN(module)
        replaced = {}
        for name, child in module._modules.items():
            if child is not None:
                new = visit(child, f"{prefix}.{name}" if prefix else name)
                if new is not child:
                    replaced[name] = new
        if not replaced:
            return module
        clone = copy.copy(module)
        clone._modules = {**module._modules, **replaced}
        return clone

    return visit(model, "")


def stepped_site(model: nn.Module, site: Site | str) -> tuple[nn.Module, Site]:
    """(model, site) to run: a site at an RNN module's output (its output sequence, ``[0]``) becomes the hook
    of a `SteppedRNN` view of the model; any other site is returned as it is."""
    site = Site.parse(site)
    try:
        module = model.get_submodule(site.module)
    except AttributeError:
        return model, site
    if isinstance(module, nn.RNNBase) and site.io == "output" and site.index in (None, 0):
        view = stepped(model, {site.module})
        return view, Site(f"{site.module}.hook" if site.module else "hook", positions=site.positions)
    if isinstance(module, nn.RNNBase) and site.io == "output" and site.index == 1:
        raise SiteError(f"site {site}: the final state h_n of {type(module).__name__} {site.module!r} is not a "
                        f"state at a step; use {site.module!r} (its state at every step)")
    return model, site
