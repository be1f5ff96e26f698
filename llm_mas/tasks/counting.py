"""Counting tasks (MultiObject, SameObject, SingleObject, Modulo, Rounding) and their causal model.

A sequence is `B D×N T R×f(N) E`: N demo tokens (uniform over the task's demo set), the trigger T, f(N)
response tokens and EOS. Demo tokens and T are given; the responses and E are task tokens.

Vocabularies (PAD=0, BOS=1, EOS=2, then the task tokens sorted):
    multiobject / modulo / rounding: D0=3 D1=4 D2=5 R=6 T=7
    singleobject: D=3 R=4 T=5
    sameobject:   D=3 T=4 (the response token is D itself)

Causal model (CountUpDown): state (obj_count, phase, count); phase 0 = demo, 1 = response (-1 = terminal).
Reading BOS: count 0, phase 0. Demo phase: a demo token increments count; the trigger sets phase 1 and
count = f(count). Response phase: a response token decrements count. Emission: demo phase -> a demo token
while count < obj_count, else T; response phase -> R while count > 0, else E.
f is the identity (multi/same/single), N mod 4 (modulo) or round to the nearest multiple of 3
(rounding: 1->0, 2..4->3, 5..7->6, ..., 20->21). Modulo's post-intervention function re-applies mod 4
to the count whenever the phase is 1 after a swap; Rounding does not re-round.

Swappable variables: count, phase (obj_count is never overwritten). Valid intervention positions: demo and
response token inputs (not BOS, T, EOS, PAD).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks.base import BOS, EOS, PAD, SPECIAL_TOKENS, SequenceBatch, Task, Vocab, check_quantities

MIN_COUNT, MAX_COUNT = 1, 20
DEMO, RESPONSE, UNDEFINED = 0, 1, -1


def identity(n: np.ndarray) -> np.ndarray:
    """f(N) = N."""
    return np.asarray(n, dtype=np.int64)


def mod4(n: np.ndarray) -> np.ndarray:
    """f(N) = N mod 4."""
    return np.asarray(n, dtype=np.int64) % 4


def round3(n: np.ndarray) -> np.ndarray:
    """f(N) = N rounded to the nearest multiple of 3 (never a tie for integers): 3·floor((N+1)/3)."""
    return 3 * ((np.asarray(n, dtype=np.int64) + 1) // 3)


class CountingTask(Task):
    """One counting task; the variants differ by vocabulary, trigger function f and post-swap function."""

    variables = ("count", "phase")
    state_variables = ("obj_count", "phase", "count")
    quantity_name = "obj_count"

    def __init__(
        self,
        name: str,
        demo_tokens: Sequence[str],
        response_token: str,
        trigger_fn: Callable[[np.ndarray], np.ndarray] = identity,
        post_swap_mod: int | None = None,
    ):
        self.name = name
        names = sorted(set(demo_tokens) | {response_token, "T"})
        self.vocab = Vocab(SPECIAL_TOKENS + tuple(names))
        self.demo_ids = np.array([self.vocab.id(t) for t in demo_tokens], dtype=np.int64)
        self.response_id = self.vocab.id(response_token)
        self.trigger_id = self.vocab.id("T")
        self.trigger_fn = trigger_fn
        self.post_swap_mod = post_swap_mod
        self.filler_token = int(self.demo_ids[-1])  # the last demo token, as the paper's code does
        f_max = int(trigger_fn(np.arange(MIN_COUNT, MAX_COUNT + 1)).max())
        self.max_len = MAX_COUNT + 3 + f_max  # B D×N T R×f(N) E

    def __repr__(self) -> str:
        return f"CountingTask({self.name!r})"

    # ---- sampling ------------------------------------------------------------------------------------------
    def sample(self, n, rng, quantities=None, hold_outs=()) -> SequenceBatch:
        allowed = check_quantities(quantities, hold_outs, MIN_COUNT, MAX_COUNT, "obj_count values")
        if n < 0:
            raise ConfigError(f"number of samples must be >= 0, got {n}")
        big_n = allowed[rng.integers(0, len(allowed), size=n)]  # (n,)
        return self._build(big_n, rng)

    def _build(self, big_n: np.ndarray, rng: np.random.Generator) -> SequenceBatch:
        """Natural sequences for the given N per row (random demo tokens)."""
        fn = self.trigger_fn(big_n)  # (n,)
        pos = np.arange(self.max_len)[None, :]  # (1, L)
        big_n_, fn_ = big_n[:, None], fn[:, None]
        demo = self.demo_ids[rng.integers(0, len(self.demo_ids), size=(len(big_n), self.max_len))]  # (n, L)
        ids = np.full((len(big_n), self.max_len), PAD, dtype=np.int64)
        ids[:, 0] = BOS
        ids = np.where((pos >= 1) & (pos <= big_n_), demo, ids)
        ids = np.where(pos == big_n_ + 1, self.trigger_id, ids)
        responses = (pos >= big_n_ + 2) & (pos <= big_n_ + 1 + fn_)
        ids = np.where(responses, self.response_id, ids)
        ids = np.where(pos == big_n_ + 2 + fn_, EOS, ids)
        task_mask = (pos >= big_n_ + 2) & (pos <= big_n_ + 2 + fn_)
        return SequenceBatch(ids, task_mask, big_n + 3 + fn)

    # ---- parsing of existing sequences -----------------------------------------------------------------------
    def _parse(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Token classes of (n, L) ids, read left to right the way the causal model reads them."""
        is_trigger = ids == self.trigger_id
        seen_trigger = np.cumsum(is_trigger, axis=1) > 0  # (n, L) inclusive
        ended = (np.cumsum(ids == EOS, axis=1) > 0) | (ids == PAD)  # at or after EOS, or padding
        is_demo = np.isin(ids, self.demo_ids) & ~seen_trigger & ~ended
        is_response = (ids == self.response_id) & seen_trigger & ~ended
        return {"trigger": is_trigger, "seen_trigger": seen_trigger, "ended": ended, "demo": is_demo,
                "response": is_response}

    def quantities(self, batch) -> np.ndarray:
        return self._parse(batch.ids)["demo"].sum(axis=1).astype(np.int64)

    def _analyse(self, ids: np.ndarray) -> dict:
        parsed = self._parse(ids)
        demo_count = np.cumsum(parsed["demo"], axis=1)  # (n, L) demo tokens read so far
        big_n = demo_count[:, -1:]  # (n, 1)
        resp_count = np.cumsum(parsed["response"], axis=1)  # (n, L) responses read so far
        seen = parsed["seen_trigger"]
        count = np.where(seen, self.trigger_fn(big_n) - resp_count, demo_count)
        phase = np.where(seen, RESPONSE, DEMO)
        undefined = parsed["ended"]
        states = {
            "obj_count": np.where(undefined, UNDEFINED, big_n).astype(np.int64),
            "phase": np.where(undefined, UNDEFINED, phase).astype(np.int64),
            "count": np.where(undefined, UNDEFINED, count).astype(np.int64),
        }
        return {"states": states, "valid": parsed["demo"] | parsed["response"]}

    def task_mask_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        seen_trigger = np.cumsum(ids == self.trigger_id, axis=1) > 0
        after_eos = np.cumsum(np.cumsum(ids == EOS, axis=1) > 0, axis=1) > 1  # strictly after the first EOS
        return seen_trigger & (ids != self.trigger_id) & (ids != PAD) & ~after_eos

    def variable_domain(self, variable: str) -> tuple[int, int]:
        if variable == "count":
            return (0, 21)
        if variable == "phase":
            return (DEMO, RESPONSE)
        raise ConfigError(f"{self.name} has no swappable variable {variable!r}; valid: {', '.join(self.variables)}")

    # ---- causal-model hooks ----------------------------------------------------------------------------------
    def cf_row_constants(self, batch) -> dict[str, np.ndarray]:
        return {"obj_count": self.analysis(batch)["states"]["obj_count"][:, 0]}  # defined at BOS

    def cf_post_swap(self, state):
        if self.post_swap_mod is None:
            return state
        state = dict(state)
        state["count"] = np.where(state["phase"] == RESPONSE, state["count"] % self.post_swap_mod, state["count"])
        return state

    def cf_continue(self, prefix_ids, prefix_len, state, reuse_ids, rng):
        """Closed form: demo phase -> max(N-c, 0) demos, T, f(max(c, N)) R's, E; response phase -> c R's, E."""
        phase = np.asarray(state["phase"], dtype=np.int64)
        count = np.asarray(state["count"], dtype=np.int64)
        big_n = np.asarray(state["obj_count"], dtype=np.int64)
        live = phase >= 0
        if (live & ((count < 0) | (big_n < 0))).any():
            raise DataError(f"{self.name}: negative count or obj_count in a live causal state")
        in_demo = phase == DEMO
        n_demo = np.where(in_demo, np.maximum(big_n - count, 0), 0)  # (n,)
        has_trigger = in_demo.astype(np.int64)
        n_resp = np.where(in_demo, self.trigger_fn(np.maximum(count, big_n)), np.where(live, count, 0))
        has_eos = live.astype(np.int64)
        start = np.asarray(prefix_len, dtype=np.int64)
        total = start + n_demo + has_trigger + n_resp + has_eos  # (n,)
        width = int(max(total.max(initial=0), prefix_ids.shape[1], 1))

        pos = np.arange(width)[None, :]  # (1, L)
        rel = pos - start[:, None]  # (n, L) offset into the continuation
        ids = np.zeros((len(start), width), dtype=np.int64)
        ids[:, : prefix_ids.shape[1]] = prefix_ids
        ids = np.where(rel < 0, ids, PAD)

        reuse = np.zeros((len(start), width), dtype=np.int64)  # the target's tokens in the same frame
        k = min(width, reuse_ids.shape[1])
        reuse[:, :k] = reuse_ids[:, :k]
        reuse_is_demo = self._parse(reuse)["demo"]
        fresh = self.demo_ids[rng.integers(0, len(self.demo_ids), size=(len(start), width))]  # (n, L)
        demo_tok = np.where(reuse_is_demo, reuse, fresh)

        d_, t_, r_ = n_demo[:, None], has_trigger[:, None], n_resp[:, None]
        demo_zone = (rel >= 0) & (rel < d_)
        trigger_zone = (rel == d_) & (t_ == 1)
        resp_zone = (rel >= d_ + t_) & (rel < d_ + t_ + r_)
        eos_zone = (rel == d_ + t_ + r_) & (has_eos[:, None] == 1)
        ids = np.where(demo_zone, demo_tok, ids)
        ids = np.where(trigger_zone, self.trigger_id, ids)
        ids = np.where(resp_zone, self.response_id, ids)
        ids = np.where(eos_zone, EOS, ids)
        return ids, resp_zone | eos_zone


def multiobject() -> CountingTask:
    """MultiObject: demo tokens D0/D1/D2, response R, f = identity."""
    return CountingTask("multiobject", ("D0", "D1", "D2"), "R")


def sameobject() -> CountingTask:
    """SameObject: one token D for demo and response, f = identity."""
    return CountingTask("sameobject", ("D",), "D")


def singleobject() -> CountingTask:
    """SingleObject: demo D, response R, f = identity."""
    return CountingTask("singleobject", ("D",), "R")


def modulo() -> CountingTask:
    """Modulo: MultiObject vocabulary, f(N) = N mod 4, mod 4 re-applied after a swap into the response phase."""
    return CountingTask("modulo", ("D0", "D1", "D2"), "R", mod4, post_swap_mod=4)


def rounding() -> CountingTask:
    """Rounding: MultiObject vocabulary, f(N) = N rounded to the nearest multiple of 3 (no re-rounding)."""
    return CountingTask("rounding", ("D0", "D1", "D2"), "R", round3)
