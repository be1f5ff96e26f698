"""Task models: the GRU, LSTM and Transformer that MAS compares on the numeric tasks.

    model = build_task_model("gru", "multiobject", vocab_size=8, seed=0)
    logits = model(input_ids)                                  # (B, T, V) teacher forced
    tokens, logits = model.rollout(input_ids, free_mask)       # free running where free_mask is True

Every model calls ``HookPoint``s on its latents so that a backend can read and edit them *inside* the
forward pass:

- ``hook_embed``: the input embeddings (B, T, d).
- ``hook_layers.{l}``: layer l's latent: the post-update RNN state at every step (LSTM: ``[h; c]``), or
  the residual stream output of Transformer block l.

A hook is called as ``hook(x, positions)`` with x (B, T_chunk, d) and the chunk's absolute positions
(T_chunk,). Recurrent models run the fused ``nn.GRU`` / ``nn.LSTM`` kernel over stretches without a
pending edit and step one position at a time (same weights) only where ``hook.steps_to_break`` says an
edit must land inside the recurrence. The Transformer calls its hooks on the whole sequence per layer
(teacher forced) or per step during KV-cached decoding, so an edit reaches later layers and the attention
of later positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import ConfigError, DataError, InterventionError, choice_error
from ..hooks import HookPoint

ARCHS = ("gru", "lstm", "transformer")

# Architecture defaults. dropout: the paper code's 0.5 in the RNN head (it regularises the readout only;
# eval mode switches it off). 0 in the Transformer: training sees fresh sequences every step, so there
# is no finite training set to overfit, and measured on MultiObject (seed 0, lr 1e-3) dropout 0.1 had not
# reached a single N at 1 000 steps where dropout 0 had every N right at 750, while costing ~50% more per
# CPU step (Bernoulli masks on every residual and attention path). The reference's 0.5 is slower still.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gru": {"d_model": 128, "n_layers": 1, "head_width": 512, "dropout": 0.5},
    "lstm": {"d_model": 128, "n_layers": 1, "head_width": 512, "dropout": 0.5},
    "transformer": {"d_model": 128, "n_layers": 2, "ff_width": 512, "dropout": 0.0, "rope_base": 10000.0},
}


def _has_hooks(module: nn.Module) -> bool:
    """True when anything (a reader or an editor) is registered on `module`."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class TaskModel(nn.Module):
    """Base class of the task models (attributes shared by every architecture).

    Attributes: ``arch`` ("gru" | "lstm" | "transformer"), ``task_name``, ``d_model`` (latent width at
    every site), ``vocab_size``, ``n_layers`` and ``config`` (the keyword arguments of
    ``build_task_model`` that rebuild this model).
    """

    arch: str = ""

    def __init__(self, task_name: str, vocab_size: int, d_model: int, n_layers: int,
                 config: dict[str, Any]) -> None:
        super().__init__()
        self.task_name = task_name
        self.vocab_size = int(vocab_size)
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.config = dict(config)
        self.embed = nn.Embedding(self.vocab_size, self.d_model)
        self.hook_embed = HookPoint()
        self.hook_layers = nn.ModuleList([HookPoint() for _ in range(self.n_layers)])

    def site_aliases(self) -> dict[str, str]:
        """Readable site names: ``embeddings``, ``hidden`` (the last layer) and ``layer{l}``."""
        aliases = {"embeddings": "hook_embed", "hidden": f"hook_layers.{self.n_layers - 1}"}
        aliases.update({f"layer{layer}": f"hook_layers.{layer}" for layer in range(self.n_layers)})
        return aliases

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, task={self.task_name!r}, d_model={self.d_model}, n_layers={self.n_layers}"

    # ------------------------------------------------------------------ shared checks
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be (B, T); got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise DataError(
                f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}] but the model's vocabulary "
                f"has {self.vocab_size} tokens; use the tokenizer of task {self.task_name!r}")

    def _positions(self, offset: int, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(offset, offset + length, device=device)  # (T,)

    # ------------------------------------------------------------------ forward
    def features(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                 position_offset: int = 0) -> torch.Tensor:
        """What the output head reads, (B, T, F), after every hook has fired (teacher forced)."""
        raise NotImplementedError

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """The output head: features (..., F) -> logits (..., V)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                position_offset: int = 0) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for input_ids (B, T).

        state: recurrent models only, the initial latent (B, d) (GRU h, LSTM ``[h; c]``); zeros when None.
        position_offset: recurrent models only, the absolute position of input_ids[:, 0] (reported to hooks).
        """
        return self.readout(self.features(input_ids, state, position_offset))

    # ------------------------------------------------------------------ decoding
    def _begin_decode(self, batch: int, state: torch.Tensor | None, position_offset: int,
                      device: torch.device) -> Any:
        raise NotImplementedError

    def _decode_step(self, token: torch.Tensor, position: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """One step: token (B,) at absolute `position` -> logits (B, V) and the updated cache."""
        raise NotImplementedError

    def rollout(self, input_ids: torch.Tensor, free_mask: torch.Tensor, state: torch.Tensor | None = None,
                position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run step by step, feeding the model's own argmax where `free_mask` is True.

        input_ids (B, T), free_mask (B, T) bool. The input at t+1 is ``argmax(logits[:, t])`` where
        ``free_mask[:, t+1]`` else ``input_ids[:, t+1]``; ``free_mask[:, 0]`` must be False (nothing
        precedes the first token). Hooks fire once per step on (B, 1, d) with the absolute position.
        Returns (tokens (B, T) long: the sequence actually fed, logits (B, T, V)).
        """
        self._check_ids(input_ids)
        if free_mask.shape != input_ids.shape:
            raise DataError(f"free_mask has shape {tuple(free_mask.shape)} but input_ids {tuple(input_ids.shape)}")
        free_mask = free_mask.to(device=input_ids.device, dtype=torch.bool)
        if free_mask.shape[1] and bool(free_mask[:, 0].any()):
            raise DataError("free_mask[:, 0] is True: the first token has no prediction to come from; "
                            "mark only tokens the model produces (the task mask) as free")
        batch, length = input_ids.shape
        cache = self._begin_decode(batch, state, position_offset, input_ids.device)
        tokens = input_ids.clone()  # (B, T)
        step_logits: list[torch.Tensor] = []
        for t in range(length):
            if t > 0:
                predicted = step_logits[-1].argmax(-1)  # (B,)
                tokens[:, t] = torch.where(free_mask[:, t], predicted, input_ids[:, t])
            logits_t, cache = self._decode_step(tokens[:, t], position_offset + t, cache)  # (B, V)
            step_logits.append(logits_t)
        if not step_logits:
            return tokens, input_ids.new_zeros((batch, 0, self.vocab_size), dtype=torch.float)
        return tokens, torch.stack(step_logits, dim=1)  # (B, T), (B, T, V)


# ====================================================================== recurrent models
class _RecurrentTaskModel(TaskModel):
    """Shared recurrence for the GRU and the LSTM (one latent of width d_model per layer)."""

    def __init__(self, task_name: str, vocab_size: int, d_model: int, n_layers: int, head_width: int,
                 dropout: float, config: dict[str, Any]) -> None:
        super().__init__(task_name, vocab_size, d_model, n_layers, config)
        self.head = nn.Sequential(
            nn.Linear(self._output_width, head_width), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(head_width, self.vocab_size))

    # per-architecture primitives -------------------------------------------------------------
    _output_width: int  # width of what the next layer and the head read from a latent
    # layer 0 may read tokens through the folded input table (`_folded_inputs`); False: always the plain
    # products (the reference the folded path is tested and benchmarked against)
    fold_inputs: bool = True
    # `continue_from` / `continue_packed` with a gradient in the latent only run the recurrence with a
    # hand-written backward (`_continue_frozen`; the GRU sets True); False: the fused kernel under autograd
    # (the reference it is tested and benchmarked against)
    hand_backward: bool = False

    def _fused(self, layer: int, x: torch.Tensor, latent: torch.Tensor, need_latents: bool,
               tokens: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Fused kernel over a stretch: x (B, S, in), latent (B, d) ->
        (latents (B, S, d) or None when not needed, outputs (B, S, out), last latent (B, d)).

        tokens (B, S): layer 0 only, given when x is exactly ``embed(tokens)`` (`_folded_inputs`): the kernel
        then reads one-hot tokens through the table embed·W_ih (V × gates) instead of projecting every
        embedding (the same numbers up to rounding, the input products V/d as wide)."""
        raise NotImplementedError

    def _cell(self, layer: int, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """One step with the fused kernel's weights: x (B, in), latent (B, d) -> latent (B, d)."""
        raise NotImplementedError

    def _readout(self, latent: torch.Tensor) -> torch.Tensor:
        """What the next layer / the head reads from a latent: (..., d) -> (..., out)."""
        raise NotImplementedError

    # state handling ----------------------------------------------------------------------------
    def _initial_latents(self, batch: int, state: torch.Tensor | None, device: torch.device
                         ) -> list[torch.Tensor]:
        if state is None:
            zeros = torch.zeros(batch, self.d_model, device=device, dtype=self.embed.weight.dtype)
            return [zeros] * self.n_layers
        if state.dim() == 2 and self.n_layers == 1:
            state = state.unsqueeze(0)  # (1, B, d)
        expected = (self.n_layers, batch, self.d_model)
        if tuple(state.shape) != expected:
            raise DataError(
                f"state has shape {tuple(state.shape)}; expected (B, d) = ({batch}, {self.d_model})"
                + (f" or (n_layers, B, d) = {expected}" if self.n_layers > 1 else ""))
        return [state[layer].to(self.embed.weight.dtype) for layer in range(self.n_layers)]

    # forward -------------------------------------------------------------------------------------
    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def features(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                 position_offset: int = 0) -> torch.Tensor:
        self._check_ids(input_ids)
        batch, length = input_ids.shape
        positions = self._positions(position_offset, length, input_ids.device)  # (T,)
        x = self.hook_embed(self.embed(input_ids), positions)  # (B, T, d)
        latents0 = self._initial_latents(batch, state, input_ids.device)
        tokens = input_ids if self._folded_inputs() else None
        for layer in range(self.n_layers):
            x = self._run_layer(layer, x, latents0[layer], positions, position_offset,
                                tokens if layer == 0 else None)  # (B, T, out)
        return x

    def _folded_inputs(self, hooks_called: bool = True) -> bool:
        """Whether layer 0's fused kernel may read tokens through the folded table embed·W_ih: nothing is
        hooked on the embeddings (the kernel's input is exactly ``embed(ids)``; hooks_called=False: no hook
        runs at all), the vocabulary is narrower than the embedding, and no gradient is asked of the
        embedding or the input weights (training a model keeps the plain products). A frozen model's MAS
        step: the input products, the larger half of the fused kernel's work on CPU (one batched product
        over the stretch), shrink by V/d."""
        rnn = self.rnns[0]
        return (self.fold_inputs and not (hooks_called and _has_hooks(self.hook_embed))
                and self.vocab_size < self.d_model
                and not (torch.is_grad_enabled() and (self.embed.weight.requires_grad
                                                      or rnn.weight_ih_l0.requires_grad)))

    # a one-layer model run from a given latent, no hook called (the MAS fast path: the problem applies
    # the edit at the intervened token itself, then continues the recurrence) ---------------------------
    def _one_layer(self, what: str) -> None:
        if self.n_layers != 1:
            raise ConfigError(f"{what} runs one-layer recurrent models only; this {self.arch} has "
                              f"{self.n_layers} layers: use features() with hooks")

    def step(self, input_ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One recurrent step without hooks: input_ids (B,) after the latent `state` (B, d) -> latent (B, d)."""
        self._one_layer("step")
        return self._cell(0, self.embed(input_ids), state.to(self.embed.weight.dtype))

    def latent_features(self, latent: torch.Tensor) -> torch.Tensor:
        """What the head reads from a latent: (..., d) -> (..., out) (the GRU's state; the LSTM's h)."""
        return self._readout(latent)

    def continue_from(self, latent: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Features (B, S, out) of input_ids (B, S) read after the latent (B, d), without hooks: the fused
        kernel from that latent (the same numbers as `features(input_ids, state=latent)` with nothing
        hooked, up to rounding), or, when only the latent needs a gradient (`_hand_backward`), the GRU's
        hand-written recurrence (same numbers up to rounding)."""
        self._one_layer("continue_from")
        tokens = input_ids if self._folded_inputs(hooks_called=False) else None
        if tokens is not None and self._hand_backward(latent):
            return self._continue_frozen(latent, tokens)
        x = self.embed(input_ids) if tokens is None else None  # the folded kernel reads the tokens
        _, out, _ = self._fused(0, x, latent, need_latents=False, tokens=tokens)
        return out

    # whether this architecture has `continue_packed` (GRU and LSTM)
    packed_continuation: bool = False

    def continue_packed(self, latent: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor
                        ) -> torch.Tensor:
        """`continue_from` for rows of different lengths in one run, without hooks: latent (R, d), input_ids
        (R, W) and lengths (R,) with rows sorted by length, longest first; row i reads input_ids[i,
        :lengths[i]] after latent[i]. Returns the features (sum(lengths), out), packed time-major as torch's
        packed sequences: step t's rows 0..b_t - 1, b_t = #(lengths > t). The numbers of `continue_from`
        row by row, up to rounding; no step runs past a row's length, and one kernel call serves every
        length (a shrinking batch instead of one run per length bucket)."""
        self._one_layer("continue_packed")
        if not self.packed_continuation:
            raise ConfigError(f"continue_packed runs GRU and LSTM models; this is a {self.arch}: use continue_from")
        if lengths.numel() > 1 and bool((lengths[1:] > lengths[:-1]).any()):
            raise DataError("continue_packed needs rows sorted by length, longest first; sort latent, input_ids "
                            "and lengths by lengths (descending) before the call")
        longest = int(lengths[0]) if lengths.numel() else 0
        if longest > input_ids.shape[1]:
            raise DataError(f"a row's length {longest} exceeds the {input_ids.shape[1]} input columns")
        if longest == 0:
            return latent.new_zeros(0, self._output_width)
        running = torch.arange(longest, device=lengths.device)[:, None] < lengths[None, :]  # (S, R)
        batch_sizes = running.sum(1).tolist()
        tokens = input_ids[:, :longest].T[running]                                         # (N,) time-major
        if self._folded_inputs(hooks_called=False) and self._hand_backward(latent):
            return self._continue_frozen(latent, tokens, batch_sizes)
        return self._packed(latent, tokens, batch_sizes)

    def _packed(self, latent: torch.Tensor, tokens: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
        """The packed run of `continue_packed` through torch's kernel (under autograd): latent (R, d), tokens
        (N,) time-major -> outputs (N, out)."""
        raise NotImplementedError

    def _packed_inputs(self, latent: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Layer 0's packed input (N, V one-hot through the folded table, or N, d embeddings) and weights."""
        rnn = self.rnns[0]
        if self._folded_inputs(hooks_called=False):
            return (F.one_hot(tokens, self.vocab_size).to(latent.dtype),
                    (self._input_table(0).T.contiguous(), rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0))
        return self.embed(tokens), (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)

    def _hand_backward(self, latent: torch.Tensor) -> bool:
        """Whether `continue_from` may run the recurrence with a hand-written backward (`_continue_frozen`):
        the architecture has one (``hand_backward``), a gradient is asked of the latent and of nothing else
        (the recurrent weights are frozen; the inputs are fixed tokens, `_folded_inputs`). Otherwise, and
        without a gradient (evaluation), the fused kernel under autograd."""
        return (self.hand_backward and torch.is_grad_enabled() and latent.requires_grad
                and not any(p.requires_grad for p in self.rnns[0].parameters()))

    def _continue_frozen(self, latent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`continue_from` through frozen weights and fixed tokens (B, S), differentiable in the latent only."""
        raise NotImplementedError

    def _input_table(self, layer: int) -> torch.Tensor:
        """(V, gates): each token's input product embed[v] · W_ih of layer 0 (no bias)."""
        return F.linear(self.embed.weight, self.rnns[layer].weight_ih_l0)

    def _run_layer(self, layer: int, x: torch.Tensor, latent: torch.Tensor, positions: torch.Tensor,
                   position_offset: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        hook = self.hook_layers[layer]
        length = x.shape[1]
        breaks = hook.steps_to_break(position_offset + length)
        if breaks is not None:
            breaks = breaks[position_offset:].tolist()  # per step of this call
        outputs: list[torch.Tensor] = []
        start = 0
        while start < length:
            if breaks is not None and breaks[start]:
                # an edit is pending here: one step, the hook may replace the state the recurrence continues from
                latent = self._cell(layer, x[:, start], latent)  # (B, d)
                latent = hook(latent.unsqueeze(1), positions[start:start + 1])[:, 0]  # (B, d)
                outputs.append(self._readout(latent).unsqueeze(1))  # (B, 1, out)
                start += 1
                continue
            stop = start + 1
            while stop < length and not (breaks is not None and breaks[stop]):
                stop += 1
            watched = _has_hooks(hook)
            latents, out, last = self._fused(layer, x[:, start:stop], latent, need_latents=watched,
                                             tokens=None if tokens is None else tokens[:, start:stop])
            if latents is not None:
                seen = hook(latents, positions[start:stop])  # (B, S, d)
                if seen is not latents:
                    self._check_fused_edit(latents, seen, positions[start:stop])
                    out, last = self._readout(seen), seen[:, -1]
            outputs.append(out)  # (B, S, out)
            latent = last
            start = stop
        if not outputs:  # an empty sequence
            return x.new_zeros(x.shape[0], 0, self._output_width)
        return torch.cat(outputs, dim=1)  # (B, T, out)

    @staticmethod
    def _check_fused_edit(before: torch.Tensor, after: torch.Tensor, positions: torch.Tensor) -> None:
        # Only the last step of a fused stretch feeds the recurrence; an edit anywhere else would not reach
        # later steps, which must never pass silently.
        if not torch.equal(before[:, :-1], after[:, :-1]):
            raise InterventionError(
                f"a hook edited the recurrent latent inside a fused stretch (positions {int(positions[0])}.."
                f"{int(positions[-1])}) without announcing it; set HookPoint.edit_steps for the edited steps "
                "(the torch backend does this) so the edit lands inside the recurrence")

    # decoding ---------------------------------------------------------------------------------------
    def _begin_decode(self, batch: int, state: torch.Tensor | None, position_offset: int,
                      device: torch.device) -> list[torch.Tensor]:
        return self._initial_latents(batch, state, device)

    def _decode_step(self, token: torch.Tensor, position: int, cache: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pos = torch.tensor([position], device=token.device)  # (1,)
        x = self.hook_embed(self.embed(token).unsqueeze(1), pos)[:, 0]  # (B, d)
        new_cache = []
        for layer in range(self.n_layers):
            latent = self._cell(layer, x, cache[layer])  # (B, d)
            latent = self.hook_layers[layer](latent.unsqueeze(1), pos)[:, 0]  # (B, d)
            new_cache.append(latent)
            x = self._readout(latent)  # (B, out)
        return self.readout(x), new_cache  # (B, V)


class _GRUContinuation(torch.autograd.Function):
    """A one-layer GRU run from a latent that needs a gradient, through frozen weights and fixed token inputs:
    the only gradient asked is the initial latent's, so the backward is a hand-written loop through time that
    carries dL/dh alone (one product with W_hh per step), with no weight or input gradient and no autograd
    graph of the per-step operations (a MAS step is 1.06-1.07x faster than with the packed run through torch's kernel).

    forward(h0 (R, d), tokens (N,), batch_sizes (S,) list, gates (V, 3d), gate_n (V, d), w_hh (3d, d),
    tanh_by_sigmoid) -> latents (N, d), packed time-major like `torch.nn.utils.rnn.PackedSequence`: step t
    runs rows 0..batch_sizes[t]-1 (non-increasing), from h0 at step 0, on tokens[offset_t:offset_t +
    batch_sizes[t]]. Per token, gates holds the input part of the reset and update pre-activations with both
    biases (``x W_ir^T + b_ir + b_hr``, the same for z) and ``b_hn`` in its last d columns, gate_n the input
    part of the candidate, ``x W_in^T + b_in``. Per step, as `torch.gru` on CPU: ``a = gates[x] + h W_hh^T``
    (one product; its last d columns are ``h W_hn^T + b_hn``), ``r, z = sigmoid(a_r), sigmoid(a_z)``,
    ``n = tanh(gate_n[x] + r a_n)``, ``h = n + z (h - n)``: the same numbers up to rounding.

    tanh_by_sigmoid: n as ``2 sigmoid(2u) - 1`` (2u computed as ``2 gate_n[x] + 2 (r a_n)``: exact, a power of
    two); this torch build's tanh costs 5x its sigmoid per element. Rows of h0 past batch_sizes[0]
    get a zero gradient.
    """

    @staticmethod
    def forward(ctx, h0, tokens, batch_sizes, gates, gate_n, w_hh, tanh_by_sigmoid):
        d = h0.shape[1]
        # one gather a step: [gates, gate_n] per token, gate_n doubled for 2 sigmoid(2u) - 1 (exact)
        table = torch.cat([gates, 2 * gate_n if tanh_by_sigmoid else gate_n], 1)          # (V, 4d)
        scale = 2.0 if tanh_by_sigmoid else 1.0
        w_t = w_hh.t()
        # Per step, small tensors only (stretch-wide buffers and passes over them cost more in cache misses
        # and page faults than they save in calls): the latent, z, and coef = d(pre-activations)/dh_t
        # (b, 3d), so that a backward step is dL/dpre = dL/dh_t coef, one product and two element-wise ops.
        h, latents, zs, coefs, offset = h0, [], [], [], 0
        for b in batch_sizes:
            x = table.index_select(0, tokens[offset:offset + b])                           # (b, 4d)
            offset += b
            h = h[:b]
            a = torch.addmm(x[:, :3 * d], h, w_t)                                          # (b, 3d)
            rz = torch.sigmoid(a[:, :2 * d])                                              # r, z (b, 2d)
            r, z, a_n = rz[:, :d], rz[:, d:], a[:, 2 * d:]
            u = torch.addcmul(x[:, 3 * d:], a_n, r, value=scale)                          # u (or 2u)
            n = torch.sigmoid(u).mul_(2).sub_(1) if tanh_by_sigmoid else torch.tanh(u)
            # coef = [dn a_n r (1 - r), (h - n) z (1 - z), dn r] with dn = dh/dn dn/du = (1 - z)(1 - n^2)
            coef = torch.empty_like(a)
            h_minus_n = torch.sub(h, n, out=coef[:, d:2 * d])
            h = torch.addcmul(n, h_minus_n, z)
            latents.append(h)
            zs.append(z)
            one_minus_z = 1 - z
            dn = torch.addcmul(one_minus_z, one_minus_z * n, n, value=-1)
            torch.mul(dn, a_n, out=coef[:, :d])
            coef[:, :2 * d].mul_(torch.addcmul(rz, rz, rz, value=-1))                     # sigmoid' = s - s^2
            torch.mul(dn, r, out=coef[:, 2 * d:])
            coefs.append(coef)
        ctx.zs, ctx.coefs, ctx.rows = zs, coefs, h0.shape[0]
        ctx.save_for_backward(w_hh)
        return torch.cat(latents) if latents else h0.new_zeros(0, d)                      # (N, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (w_hh,) = ctx.saved_tensors
        zs, coefs = ctx.zs, ctx.coefs
        d = grad.shape[1]
        carry, end = None, grad.shape[0]
        for z, coef in zip(reversed(zs), reversed(coefs)):
            b = z.shape[0]
            g = grad[end - b:end]                                                          # dL/dh_t, own output
            end -= b
            if carry is not None:                                                          # ... and later steps
                if carry.shape[0] == b:
                    g = g + carry
                else:
                    g = g.clone()
                    g[:carry.shape[0]] += carry
            d_pre = torch.mul(g.unsqueeze(1), coef.view(b, 3, d)).view(b, 3 * d)
            carry = torch.addmm(g * z, d_pre, w_hh)                                        # dL/dh_{t-1}
        if carry is None:
            carry = grad.new_zeros(ctx.rows, d)
        elif carry.shape[0] < ctx.rows:
            carry = F.pad(carry, (0, 0, 0, ctx.rows - carry.shape[0]))
        return carry, None, None, None, None, None, None


class GRUTaskModel(_RecurrentTaskModel):
    """Embedding -> GRU(d) per layer -> head Linear(d, 512) -> GELU -> Dropout -> Linear(512, V)."""

    arch = "gru"

    def __init__(self, task_name: str, vocab_size: int, d_model: int = 128, n_layers: int = 1,
                 head_width: int = 512, dropout: float = 0.5, config: dict[str, Any] | None = None) -> None:
        self._output_width = d_model
        super().__init__(task_name, vocab_size, d_model, n_layers, head_width, dropout, config or {})
        self.rnns = nn.ModuleList([nn.GRU(d_model, d_model, batch_first=True) for _ in range(n_layers)])

    def _fused(self, layer, x, latent, need_latents, tokens=None):
        rnn = self.rnns[layer]
        h0 = latent.unsqueeze(0).contiguous()  # (1, B, d)
        if tokens is None:
            out, last = rnn(x, h0)  # (B, S, d), (1, B, d)
        else:  # one-hot tokens through the folded input table (V, 3d): same gates up to rounding
            onehot = F.one_hot(tokens, self.vocab_size).to(latent.dtype)  # (B, S, V)
            weights = (self._input_table(layer).T.contiguous(), rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
            out, last = torch.gru(onehot, h0, weights, True, 1, 0.0, False, False, True)
        return out, out, last[0]

    # the hand-written recurrence (`_GRUContinuation`); tanh_by_sigmoid: its candidate as 2 sigmoid(2u) - 1
    packed_continuation = True
    hand_backward = True
    tanh_by_sigmoid = True

    def _continue_frozen(self, latent, tokens, batch_sizes=None):
        rnn, d = self.rnns[0], self.d_model
        table = self._input_table(0) + rnn.bias_ih_l0                                  # (V, 3d)
        bias_hh = rnn.bias_hh_l0
        # per token: [x W_ir^T + b_ir + b_hr, x W_iz^T + b_iz + b_hz, b_hn] and x W_in^T + b_in
        gates = torch.cat([table[:, :2 * d] + bias_hh[:2 * d], bias_hh[2 * d:].expand(len(table), d)], 1)
        if batch_sizes is None:                                                            # (B, S): every row
            batch, steps = tokens.shape
            packed = _GRUContinuation.apply(latent.to(table.dtype), tokens.T.reshape(-1), [batch] * steps, gates,
                                            table[:, 2 * d:].contiguous(), rnn.weight_hh_l0, self.tanh_by_sigmoid)
            return packed.view(steps, batch, d).transpose(0, 1)                            # (B, S, d)
        return _GRUContinuation.apply(latent.to(table.dtype), tokens, batch_sizes, gates,
                                      table[:, 2 * d:].contiguous(), rnn.weight_hh_l0, self.tanh_by_sigmoid)

    def _packed(self, latent, tokens, batch_sizes):
        h0 = latent[:batch_sizes[0]].unsqueeze(0).contiguous()                             # (1, b_0, d)
        x, weights = self._packed_inputs(latent, tokens)
        out, _ = torch.gru(x, torch.tensor(batch_sizes, dtype=torch.long), h0, weights, True, 1, 0.0, False, False)
        return out

    def _cell(self, layer, x, latent):
        rnn = self.rnns[layer]
        return torch.gru_cell(x, latent, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)

    def _readout(self, latent):
        return latent


class LSTMTaskModel(_RecurrentTaskModel):
    """Embedding -> LSTM(d -> d/2) per layer; latent ``[h; c]`` (d); the head reads h only.

    An edit of the latent is split back into h and c, and both continue the recurrence.
    """

    arch = "lstm"

    def __init__(self, task_name: str, vocab_size: int, d_model: int = 128, n_layers: int = 1,
                 head_width: int = 512, dropout: float = 0.5, config: dict[str, Any] | None = None) -> None:
        if d_model % 2:
            raise ConfigError(f"LSTM d_model {d_model} must be even (the latent is [h; c] with h, c of d/2 each)")
        self.hidden = d_model // 2
        self._output_width = self.hidden
        super().__init__(task_name, vocab_size, d_model, n_layers, head_width, dropout, config or {})
        self.rnns = nn.ModuleList([
            nn.LSTM(d_model if layer == 0 else self.hidden, self.hidden, batch_first=True)
            for layer in range(n_layers)])

    def _split(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return latent[..., : self.hidden], latent[..., self.hidden:]  # h, c (..., d/2) each

    def _fused(self, layer, x, latent, need_latents, tokens=None):
        rnn = self.rnns[layer]
        h0, c0 = self._split(latent)
        state = (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
        if tokens is None:
            h_seq, (h_last, c_last) = rnn(x, state)
            x_gates = None
        else:  # one-hot tokens through the folded input table (V, 4·d/2): same gates up to rounding
            table = self._input_table(layer)
            onehot = F.one_hot(tokens, self.vocab_size).to(latent.dtype)  # (B, S, V)
            weights = (table.T.contiguous(), rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
            h_seq, h_last, c_last = torch.lstm(onehot, state, weights, True, 1, 0.0, False, False, True)
            x_gates = table[tokens]
        last = torch.cat([h_last[0], c_last[0]], dim=-1)  # (B, d)
        if not need_latents:
            return None, h_seq, last
        # The fused kernel returns h at every step but c only at the end; recover c_t from the gates, which
        # depend on the known h_{t-1} only, by the (elementwise) cell recurrence c_t = f_t c_{t-1} + i_t g_t.
        h_prev = torch.cat([h0.unsqueeze(1), h_seq[:, :-1]], dim=1)  # (B, S, d/2)
        x_gates = x @ rnn.weight_ih_l0.T if x_gates is None else x_gates  # (B, S, 4·d/2)
        gates = (x_gates + rnn.bias_ih_l0 + h_prev @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)
        i, f, g, _ = gates.chunk(4, dim=-1)  # (B, S, d/2) each; PyTorch gate order i, f, g, o
        i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
        c = c0
        cells = []
        for t in range(x.shape[1]):
            c = f[:, t] * c + i[:, t] * g[:, t]  # (B, d/2)
            cells.append(c)
        latents = torch.cat([h_seq, torch.stack(cells, dim=1)], dim=-1)  # (B, S, d)
        return latents, h_seq, last

    packed_continuation = True

    def _packed(self, latent, tokens, batch_sizes):
        h0, c0 = self._split(latent[:batch_sizes[0]])                                      # (b_0, d/2) each
        x, weights = self._packed_inputs(latent, tokens)
        out, _, _ = torch.lstm(x, torch.tensor(batch_sizes, dtype=torch.long),
                               (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()), weights, True, 1,
                               0.0, False, False)
        return out                                                                          # (N, d/2): h

    def _cell(self, layer, x, latent):
        rnn = self.rnns[layer]
        h, c = self._split(latent)
        h, c = torch.lstm_cell(x, (h.contiguous(), c.contiguous()), rnn.weight_ih_l0, rnn.weight_hh_l0,
                               rnn.bias_ih_l0, rnn.bias_hh_l0)
        return torch.cat([h, c], dim=-1)  # (B, d)

    def _readout(self, latent):
        return latent[..., : self.hidden]


# ====================================================================== transformer
def _rope_tables(positions: torch.Tensor, width: int, base: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (T, width/2) for absolute `positions` (T,)."""
    inv_freq = base ** (-torch.arange(0, width, 2, device=positions.device, dtype=torch.float64) / width)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, width/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + width/2) of x (B, T, width) by the position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T, width)


class _Block(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN x), then x + FF(LN x). One causal head of width d, RoPE on all of it."""

    def __init__(self, d_model: int, ff_width: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_width), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_width, d_model))
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, causal: bool = True
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, d) -> (x (B, T, d), (keys, values) (B, 1, T_past + T, d)).

        With a cache the T new positions attend to all cached ones (decoding: T = 1, no mask needed).
        """
        q, k, v = self.qkv(self.ln_attn(x)).chunk(3, dim=-1)  # (B, T, d) each
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # (B, 1 head, T, d)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)  # (B, 1, T_past + T, d)
            v = torch.cat([cache[1], v], dim=2)
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and cache is None,
            dropout_p=self.dropout if self.training else 0.0)  # (B, 1, T, d)
        x = x + self.resid_drop(self.out(attn.squeeze(1)))  # (B, T, d)
        x = x + self.resid_drop(self.ff(self.ln_ff(x)))
        return x, (k, v)

    def forward_from(self, x: torch.Tensor, start: torch.Tensor, context: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, query: torch.Tensor | None = None, frozen_after: int | None = None
                     ) -> torch.Tensor:
        """The block's output at a suffix of each row only (eval mode, no dropout).

        x (B, S, d): the block's input at absolute positions ``start[b] + 0..S-1`` of row b (start (B,));
        context (B, P, d): its input at absolute positions 0..P-1, read at positions < start[b] only (keys and
        values there; P >= max(start)). cos, sin: RoPE tables (>= max(start) + S rows, d/2). query (B, M):
        the outputs wanted, as indices into x's positions (None: all S). frozen_after: x's positions from this
        one on carry no gradient (their queries, keys and values are computed without a graph; the result is
        the same). Queries attend causally over all positions; the result equals ``forward``'s output at
        those positions.
        """
        batch, width, d = x.shape
        absolute = start[:, None] + torch.arange(width, device=x.device)[None, :]          # (B, S)
        if frozen_after is None:
            qkv = self.qkv(self.ln_attn(x))
        else:
            with torch.no_grad():
                rest = self.qkv(self.ln_attn(x[:, frozen_after:].detach()))
            qkv = torch.cat([self.qkv(self.ln_attn(x[:, :frozen_after])), rest], 1)
        q, k, v = qkv.chunk(3, dim=-1)                                                      # (B, S, d) each
        k = _apply_rope(k, cos[absolute], sin[absolute])
        # the context's keys and values only (its queries are never read)
        span = context.shape[1]
        k_ctx, v_ctx = F.linear(self.ln_attn(context), self.qkv.weight[d:], self.qkv.bias[d:]).chunk(2, dim=-1)
        k_ctx = _apply_rope(k_ctx, cos[:span], sin[:span])                                  # (B, P, d)
        if query is not None:
            at = query[..., None].expand(-1, -1, d)                                         # (B, M, d)
            q, x, absolute_q = q.gather(1, at), x.gather(1, at), absolute.gather(1, query)
        else:
            absolute_q = absolute
        q = _apply_rope(q, cos[absolute_q], sin[absolute_q])                               # (B, M, d)
        keys, values = torch.cat([k_ctx, k], 1), torch.cat([v_ctx, v], 1)                  # (B, P + S, d)
        ctx_pos = torch.arange(span, device=x.device)
        mask = torch.cat([(ctx_pos[None, :] < start[:, None])[:, None, :].expand(-1, q.shape[1], -1),
                          absolute[:, None, :] <= absolute_q[:, :, None]], dim=-1)          # (B, M, P + S)
        attn = F.scaled_dot_product_attention(q.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1),
                                              attn_mask=mask.unsqueeze(1))                 # (B, 1, M, d)
        x = x + self.out(attn.squeeze(1))
        return x + self.ff(self.ln_ff(x))                                                   # (B, M, d)


class TransformerTaskModel(TaskModel):
    """Causal pre-LayerNorm Transformer: one head, RoPE on the full head, FF with GELU, final LN -> Linear."""

    arch = "transformer"

    def __init__(self, task_name: str, vocab_size: int, d_model: int = 128, n_layers: int = 2,
                 ff_width: int = 512, dropout: float = 0.0, rope_base: float = 10000.0,
                 config: dict[str, Any] | None = None) -> None:
        if d_model % 2:
            raise ConfigError(f"Transformer d_model {d_model} must be even (RoPE rotates feature pairs)")
        super().__init__(task_name, vocab_size, d_model, n_layers, config or {})
        self.rope_base = float(rope_base)
        self.blocks = nn.ModuleList([_Block(d_model, ff_width, dropout) for _ in range(n_layers)])
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab_size)
        self.embed_drop = nn.Dropout(dropout)

    def _no_state(self, state: torch.Tensor | None, position_offset: int) -> None:
        if state is not None:
            raise ConfigError("the Transformer has no recurrent state; pass state=None (give the prefix as input)")
        if position_offset != 0:
            raise ConfigError(
                f"position_offset={position_offset} is for recurrent models only; the Transformer needs the whole "
                "sequence from position 0")

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.ln_final(features))

    def features(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                 position_offset: int = 0) -> torch.Tensor:
        self._no_state(state, position_offset)
        self._check_ids(input_ids)
        positions = self._positions(0, input_ids.shape[1], input_ids.device)  # (T,)
        x = self.hook_embed(self.embed(input_ids), positions)  # (B, T, d)
        x = self.embed_drop(x)
        cos, sin = _rope_tables(positions, self.d_model, self.rope_base, x.dtype)  # (T, d/2)
        for layer, block in enumerate(self.blocks):
            x, _ = block(x, cos, sin)
            x = self.hook_layers[layer](x, positions)  # (B, T, d)
        return x

    def features_from(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Features (B, T, d) when block `layer` outputs `hidden` (B, T, d): blocks layer+1.. only (their hooks
        fire as in `features`). Positions are 0..T-1."""
        positions = self._positions(0, hidden.shape[1], hidden.device)  # (T,)
        cos, sin = _rope_tables(positions, self.d_model, self.rope_base, hidden.dtype)  # (T, d/2)
        x = hidden
        for i in range(layer + 1, self.n_layers):
            x, _ = self.blocks[i](x, cos, sin)
            x = self.hook_layers[i](x, positions)  # (B, T, d)
        return x

    def block_outputs(self, input_ids: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The outputs (B, T, d) of blocks 0..last on input_ids (B, T): hooks fire as in `features`."""
        self._check_ids(input_ids)
        positions = self._positions(0, input_ids.shape[1], input_ids.device)  # (T,)
        x = self.embed_drop(self.hook_embed(self.embed(input_ids), positions))  # (B, T, d)
        cos, sin = _rope_tables(positions, self.d_model, self.rope_base, x.dtype)  # (T, d/2)
        outputs = []
        for layer, block in enumerate(self.blocks[:last + 1]):
            x, _ = block(x, cos, sin)
            x = self.hook_layers[layer](x, positions)  # (B, T, d)
            outputs.append(x)
        return outputs

    def blocks_from(self, first: int, x: torch.Tensor, start: torch.Tensor, contexts: list[torch.Tensor],
                    query: torch.Tensor | None = None, frozen_after: int | None = None) -> torch.Tensor:
        """Blocks first .. first + len(contexts) - 1 on a suffix of each row (``_Block.forward_from``, eval mode;
        hooks do not fire).

        x (B, S, d): block `first`'s input at absolute positions ``start[b] + 0..S-1``; contexts[i] (B, P, d):
        block first+i's input at positions 0..P-1 (read before start[b] only; P >= max(start)). query (B, M):
        the last block's outputs wanted, as indices into x's positions (None: all). frozen_after: x's positions
        from this one on carry no gradient into the first block (``_Block.forward_from``). Returns the last
        block's output (B, M or S, d) (the head's features there when the last block is the model's last).
        """
        if not contexts or first < 0 or first + len(contexts) > self.n_layers:
            raise ConfigError(f"blocks_from({first}) with {len(contexts)} contexts: the blocks must lie in "
                              f"0..{self.n_layers - 1} (one context per block run)")
        if self.training and any(block.dropout for block in self.blocks):
            raise ConfigError("blocks_from runs without dropout: put the model in eval mode (model.eval())")
        need = int(start.max()) + x.shape[1] if len(start) else x.shape[1]
        positions = self._positions(0, max(need, max(c.shape[1] for c in contexts)), x.device)
        cos, sin = _rope_tables(positions, self.d_model, self.rope_base, x.dtype)
        blocks = self.blocks[first:first + len(contexts)]
        for i, (block, context) in enumerate(zip(blocks, contexts)):
            x = block.forward_from(x, start, context, cos, sin, query if i == len(blocks) - 1 else None,
                                   frozen_after if i == 0 else None)
        return x

    def _begin_decode(self, batch, state, position_offset, device):
        self._no_state(state, position_offset)
        return [None] * self.n_layers  # per layer (keys, values) (B, 1, t, d)

    def _decode_step(self, token, position, cache):
        pos = torch.tensor([position], device=token.device)  # (1,)
        x = self.hook_embed(self.embed(token).unsqueeze(1), pos)  # (B, 1, d)
        x = self.embed_drop(x)
        cos, sin = _rope_tables(pos, self.d_model, self.rope_base, x.dtype)  # (1, d/2)
        new_cache = []
        for layer, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, cache=cache[layer])
            new_cache.append(kv)
            x = self.hook_layers[layer](x, pos)  # (B, 1, d)
        return self.readout(x)[:, 0], new_cache  # (B, V)


_CLASSES: dict[str, type[TaskModel]] = {
    "gru": GRUTaskModel, "lstm": LSTMTaskModel, "transformer": TransformerTaskModel}


def build_task_model(arch: str, task_name: str, vocab_size: int, seed: int = 0, **overrides: Any) -> TaskModel:
    """A freshly initialised task model (weights drawn from `seed`; the global RNG is left untouched).

    overrides: architecture hyper-parameters (see ``DEFAULTS[arch]``), e.g. ``dropout=0.0``.
    Unknown arch or override keys raise a ConfigError listing the valid choices.
    """
    if arch not in _CLASSES:
        raise choice_error("arch", arch, ARCHS)
    params = dict(DEFAULTS[arch])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ConfigError([f"unknown {arch} model option {key!r}; valid options: {', '.join(sorted(params))}"
                           for key in unknown])
    params.update(overrides)
    problems = []
    if int(vocab_size) < 3:
        problems.append(f"vocab_size {vocab_size} must be at least 3 (PAD, BOS, EOS)")
    for key in ("d_model", "n_layers", "head_width", "ff_width"):
        if key in params and int(params[key]) < 1:
            problems.append(f"{key} {params[key]} must be a positive integer")
    if not 0.0 <= float(params["dropout"]) < 1.0:
        problems.append(f"dropout {params['dropout']} must be in [0, 1)")
    if problems:
        raise ConfigError(problems)
    config = {"arch": arch, "task_name": task_name, "vocab_size": int(vocab_size), "seed": int(seed), **params}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = _CLASSES[arch](task_name, int(vocab_size), config=config, **params)
    return model


def build_from_settings(settings: Any, seed: int | None = None) -> TaskModel:
    """A freshly initialised task model from the settings a checkpoint records (``config.yaml``'s ``model``
    section, or a loaded model's ``.config``: arch, task_name, vocab_size, seed and the architecture's
    options); ``seed`` replaces the recorded seed (an untrained control)."""
    settings = dict(settings)
    arch, task_name, vocab_size = settings.pop("arch"), settings.pop("task_name"), settings.pop("vocab_size")
    recorded = settings.pop("seed", 0)
    return build_task_model(arch, task_name, vocab_size, seed=recorded if seed is None else seed, **settings)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHS", "DEFAULTS", "GRUTaskModel", "LSTMTaskModel", "TaskModel", "TransformerTaskModel",
           "build_from_settings", "build_task_model", "count_parameters"]
