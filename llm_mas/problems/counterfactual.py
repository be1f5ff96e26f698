"""MAS on counterfactual datasets: HF causal LMs (and task models) on a user dataset or a built-in task.

    llm-mas mas CONFIG.yaml        # data.dataset: cf.jsonl   or   data.task: multiobject

The run's kind is ``counterfactual`` when ``data.dataset`` or ``data.task`` is set. Every model sees the
same counterfactual pairs in its own token space (`llm_mas.tasks.counterfactual_data`):

- ``data.dataset``: rows of (base, source, positions, continuation); HF models only; one variable, full;
- ``data.task``: pairs drawn from the task's causal model (``make_pairs``, indywise or stepwise per
  ``data.stepwise``, one pair set per variable), rendered as text for an HF model (``kind: hf``, any
  tokenizer) or read as task ids by a task model (``kind: task``, which must be trained on that task).

For a direction (s, t) the target t reads the base followed by the counterfactual continuation; at its
intervened positions its latent becomes

    h_t' = A_t⁻¹((1 − m) ⊙ A_t(h_t) + m ⊙ A_s(h_s))

with h_s the source's latent on its own text at the corresponding position (collected once per split).
Loss: cross-entropy over the continuation's scored tokens (teacher forced), averaged per direction, then
over the trained directions. Token IIA: scored tokens predicted right; trial IIA: all of a pair's scored
tokens right. Teacher forcing feeds the data's tokens, so "all right" is the same event as in a greedy
rollout that feeds the model's own (the histories agree up to the first error).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import BACKENDS, backend_facts, get_backend
from ..backends.base import Edit
from ..errors import ConfigError, DataError
from ..llm.record import IGNORE_INDEX
from ..tasks.counterfactual_data import (
    EncodedPairs,
    TextRow,
    encode_task_pairs,
    encode_text_rows,
    load_dataset,
    split_rows,
    unknown_token_report,
)
from .base import DirectionPairs, ModelEntry, PairScores, ProblemBase, Shard

SPLIT_IDS = {"train": 0, "valid": 1}


@dataclass
class CounterfactualModelEntry(ModelEntry):
    """A model of a counterfactual run: an HF LM (``tokenizer`` set) or a task model (``tokenizer`` None)."""

    kind: str                 # hf | task
    tokenizer: Any
    backend: Any
    device: torch.device


@dataclass
class CounterfactualPairs(DirectionPairs):
    """One (source, target, variable) on one split, tensors on the target's device."""

    target_ids: torch.Tensor     # (n, T)
    attention: torch.Tensor      # (n, T) 1 = real token
    labels: torch.Tensor         # (n, T) IGNORE_INDEX where not scored
    mask: torch.Tensor           # (n, T) bool, the intervened target positions
    slot: torch.Tensor           # (n, T) long, the slot (index into the source's latents) of each masked position
    source_latents: torch.Tensor  # (n, P, d_s) the source's latents at its slots (float32, target device)

    def __len__(self) -> int:
        return int(self.target_ids.shape[0])


def _target_tensors(enc: EncodedPairs, device) -> tuple[torch.Tensor, ...]:
    n, width = enc.target_ids.shape
    mask = np.zeros((n, width), bool)
    slot = np.zeros((n, width), np.int64)
    rows, slots = np.nonzero(enc.target_pos >= 0)
    mask[rows, enc.target_pos[rows, slots]] = True
    slot[rows, enc.target_pos[rows, slots]] = slots
    as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return as_t(enc.target_ids), as_t(enc.target_mask), as_t(enc.labels), as_t(mask), as_t(slot)


class CounterfactualProblem(ProblemBase):
    """Pairs per model token space, cached source latents, loss and IIA (module docstring).

    encoded: {split: {variable: [EncodedPairs of model i]}}; the models were resolved by the builder.
    """

    supported_interventions = ("interchange", "stitch")

    def __init__(self, models: Sequence[CounterfactualModelEntry], variables: Sequence[str], k: int,
                 encoded: dict[str, dict[str, list[EncodedPairs]]], *, stepwise: bool = False,
                 train_directions=None, seed: int = 0, intervention: str = "interchange",
                 eval_batch_size: int = 64):
        n_train = len(encoded["train"][variables[0]][0])
        n_valid = len(encoded["valid"][variables[0]][0])
        super().__init__(models, variables, k, stepwise=stepwise, train_directions=train_directions,
                         intervention=intervention, n_train=n_train, n_valid=n_valid, seed=seed,
                         eval_batch_size=eval_batch_size)
        self.splits = {}
        for split, per_variable in encoded.items():
            latents = {v: [self._source_latents(m, encs[i]) for i, m in enumerate(self.models)]
                       for v, encs in per_variable.items()}
            if split == "train":
                self.latent_stats = []
                for i in range(len(self.models)):
                    x = torch.cat([lat[i][encs[i].source_pos >= 0] for v, encs in per_variable.items()
                                   for lat in [latents[v]]])                        # (slots, d)
                    self.latent_stats.append((x.mean(0).cpu(), x.std(0).clamp(min=1e-6).cpu()))
            items = []
            for s, t in self.directions:
                for v in self.variables:
                    target = self.models[t]
                    ids, attention, labels, mask, slot = _target_tensors(per_variable[v][t], target.device)
                    items.append(CounterfactualPairs(
                        s, t, v, self.blocks[v], (s, t) in self.train_directions, ids, attention, labels, mask,
                        slot, latents[v][s].to(target.device)))
            self.splits[split] = items

    # ------------------------------------------------------------------ data
    def _feed(self, entry: CounterfactualModelEntry, ids: torch.Tensor, attention: torch.Tensor) -> dict:
        if entry.kind == "task":
            return {"input_ids": ids}
        return {"input_ids": ids, "attention_mask": attention, "use_cache": False}

    def _source_latents(self, entry: CounterfactualModelEntry, enc: EncodedPairs) -> torch.Tensor:
        """(n, P, d) float32 latents of the entry on the source texts at their slots (zeros where no slot)."""
        out = []
        ids = torch.as_tensor(enc.source_ids)
        attention = torch.as_tensor(enc.source_mask)
        pos = torch.as_tensor(enc.source_pos)
        with torch.no_grad():
            for lo in range(0, len(ids), self.eval_batch_size):
                rows = slice(lo, lo + self.eval_batch_size)
                feed = self._feed(entry, ids[rows].to(entry.device), attention[rows].to(entry.device))
                h = entry.backend.collect(entry.model, feed, [entry.site])[str(entry.site)].float()  # (b, S, d)
                p = pos[rows].to(entry.device)                                                  # (b, P)
                picked = h.gather(1, p.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))      # (b, P, d)
                out.append(torch.where((p >= 0)[..., None], picked, torch.zeros_like(picked)).cpu())
        return torch.cat(out)

    def _group_key(self, pairs: DirectionPairs):
        return pairs.target, pairs.variable   # one variable's pairs share the target's inputs

    # ------------------------------------------------------------------ one patched run per target
    def _run(self, maps, items: Sequence[CounterfactualPairs], rows: torch.Tensor):
        """Run the shared target of `items` once on their rows (concatenated) → logits (R, T, V), labels (R, T)."""
        target = self.models[items[0].target]
        dev = target.device
        rows = rows.to(dev)
        ids = items[0].target_ids[rows].repeat(len(items), 1)          # (R, T): same base texts per item
        attention = items[0].attention[rows].repeat(len(items), 1)
        labels = items[0].labels[rows].repeat(len(items), 1)
        R, T = ids.shape
        edits = []
        for j, item in enumerate(items):
            full = torch.zeros(R, T, dtype=torch.bool, device=dev)
            mask = item.mask[rows]                                      # (b, T)
            full[j * len(rows):(j + 1) * len(rows)] = mask
            r, c = mask.nonzero(as_tuple=True)                          # entries in row-major order
            h_source = item.source_latents[rows[r], item.slot[rows][r, c]]   # (entries, d_s)
            edits.append(Edit(site=target.site, mask=full, fn=self._edit_fn(maps, item, h_source)))
        logits = target.backend.patch(target.model, self._feed(target, ids, attention), edits)  # (R, T, V)
        return logits, labels

    def _edit_fn(self, maps, item: CounterfactualPairs, h_source: torch.Tensor):
        intervention, s, t, block = self.intervention, item.source, item.target, item.block
        return lambda h, which: intervention(maps, h.float(), h_source[which], s, t, block).to(h.dtype)

    # ------------------------------------------------------------------ trainer interface
    def loss(self, maps, batch_index: torch.Tensor):
        """Mean over trained items of the token-averaged CE on the scored continuation tokens."""
        trained = [d for d in self.splits["train"] if d.trained]
        if not trained:
            raise ConfigError("no trained directions: set directions to include at least one [source, target]")
        total = 0.0
        for group in self._groups(trained):
            logits, labels = self._run(maps, group, batch_index)
            per_row = _row_ce(logits, labels)                           # (R,)
            n_tok = (labels != IGNORE_INDEX).sum(1)                     # (R,)
            b = len(batch_index)
            for j in range(len(group)):
                seg = slice(j * b, (j + 1) * b)
                total = total + (per_row[seg].sum() / n_tok[seg].sum().clamp(min=1)).to(self.models[0].device)
        return total / len(trained), {}

    def _pair_scores(self, maps, split: str, with_ci: bool) -> dict[int, PairScores]:
        out = {}
        for group in self._groups(self.splits[split]):
            n = len(group[0])
            acc = {id(d): {"ok": [], "n": [], "ce": 0.0} for d in group}
            step = max(1, self.eval_batch_size // len(group))
            for lo in range(0, n, step):
                rows = torch.arange(lo, min(n, lo + step))
                with torch.no_grad():
                    logits, labels = self._run(maps, group, rows)
                scored = labels != IGNORE_INDEX
                correct = ((logits.argmax(-1) == labels) & scored).sum(1).cpu()   # (R,)
                n_tok = scored.sum(1).cpu()
                ce = _row_ce(logits, labels).double().cpu()
                for j, d in enumerate(group):
                    seg = slice(j * len(rows), (j + 1) * len(rows))
                    acc[id(d)]["ok"].append(correct[seg])
                    acc[id(d)]["n"].append(n_tok[seg])
                    acc[id(d)]["ce"] += float(ce[seg].sum())
            for d in group:
                ok, n_tok = torch.cat(acc[id(d)]["ok"]).numpy(), torch.cat(acc[id(d)]["n"]).numpy()
                out[id(d)] = PairScores(trial=(ok == n_tok).astype(float), correct=ok, scored=n_tok,
                                        loss_sum=acc[id(d)]["ce"])
        return out

    def _extra_fields(self, maps, item, scores: PairScores, with_ci: bool) -> dict:
        return {"n_tokens": int(scores.scored.sum())}


def _row_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R, T, V), (R, T) → (R,) float32 CE summed over each row's scored tokens."""
    scored = labels != IGNORE_INDEX
    row = scored.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[scored].float(), labels[scored], reduction="none")
    return torch.zeros(labels.shape[0], device=ce.device).index_add(0, row, ce)


# ---------------------------------------------------------------------------------------------- building
def counterfactual_problems(config) -> list[str]:
    """What is wrong with a counterfactual run config (``data.dataset`` or ``data.task`` set); no loading."""
    from ..tasks.binding import get_text_task

    p = []
    data = config.data
    if data.dataset is not None and data.task is not None:
        p.append("data: set either data.dataset (a JSONL/CSV file) or data.task (a built-in task), not both")
    if data.dataset is not None:
        if Path(data.dataset).suffix.lower() not in (".jsonl", ".csv"):
            p.append(f"data.dataset: {data.dataset!r} must be a .jsonl or .csv file")
        elif not Path(data.dataset).is_file():
            p.append(f"data.dataset: {data.dataset!r} does not exist")
        if list(config.variables) != ["full"]:
            p.append(f"variables: a dataset run has one variable, 'full' (the dataset's); got {config.variables}")
        if data.stepwise:
            p.append("data.stepwise: a dataset row intervenes at one position per text; set data.stepwise: false")
    if data.task is not None:
        try:
            get_text_task(data.task)
        except ConfigError as e:
            p.append(f"data.task: {e}")
    if config.null_subspace:
        p.append("null_subspace: not implemented for counterfactual runs; set null_subspace: false")
    if config.intervention not in CounterfactualProblem.supported_interventions:
        p.append(f"intervention: {config.intervention!r} is not available for counterfactual runs; use "
                 "interchange or stitch")
    for i, m in enumerate(config.models):
        if getattr(m, "kind", None) == "hf":
            if m.recording is not None:
                p.append(f"models.{i}.recording: a counterfactual run reads data.dataset / data.task, not a "
                         "recording; remove it")
            if m.backend in BACKENDS and backend_facts(m.backend).converts_model:
                p.append(f"models.{i}.backend: {m.backend} runs a converted copy of the model, which counterfactual "
                         "runs do not support (positions are read in the HF tokenizer's space); use torch or nnsight")
        elif getattr(m, "kind", None) == "task" and data.dataset is not None:
            p.append(f"models.{i}: a task model reads task ids, not text; a dataset run takes HF models only "
                     "(use data.task to align a task model with an LM)")
    return p


def _task_model_task(name: str) -> str:
    from ..models.registry import resolve_model_dir
    from ..models.training import read_run_config

    run_dir, entry = resolve_model_dir(name)
    return (entry or {"task": read_run_config(run_dir)["train"]["task"]})["task"]


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from ..llm.loading import resolve_model_location

    location, _ = resolve_model_location(name, "tokenizer")
    return AutoTokenizer.from_pretrained(location)


def _names(config) -> list[str]:
    names = [Path(str(getattr(m, "adapter", None) or m.name).rstrip("/")).name
             + ("-untrained" if getattr(m, "untrained", False) else "") for m in config.models]
    if len(set(names)) != len(names):  # the same model twice: keep names distinct
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _natural_length_pairs(task, base, variable, n: int, rng, data):
    """`n` pairs whose counterfactual is no longer than the task's longest natural sequence (an indywise
    swap can lengthen a sequence beyond what a model ever read, e.g. past a GPT-2's positions); longer
    ones are redrawn."""
    from ..tasks import make_pairs

    kept = None
    for _ in range(20):
        pairs = make_pairs(task, base, task, base, variable, max(n, 16) * 2, rng, stepwise=data.stepwise,
                           value_range=data.value_range)
        ok = np.flatnonzero(pairs.lengths <= task.max_len)
        part = pairs.subset(ok)
        if kept is None:
            kept = part
        else:
            width = max(kept.width, part.width)
            kept, part = kept.pad_to(width), part.pad_to(width)
            kept = type(kept)(np.concatenate([kept.ids, part.ids]), np.concatenate([kept.task_mask, part.task_mask]),
                              *(np.concatenate([getattr(kept, f), getattr(part, f)])
                                for f in ("target_index", "target_pos", "source_index", "source_pos")),
                              kept.variable, kept.stepwise,
                              {k: np.concatenate([kept.intended[k], part.intended[k]]) for k in kept.intended},
                              kept.swaps)
        if len(kept) >= n:
            return kept.subset(np.arange(n))
    raise ConfigError(f"variable {variable!r}: too few counterfactuals of {task.name} fit its natural length "
                      f"{task.max_len}")


UNKNOWN_TOKENS_FIX = ("write every text in words each model's tokenizer knows (README: 'The text each shipped LM "
                      "reads'), or set data.allow_unknown_tokens: true to run with them")


def check_unknown_tokens(config, tokenizers: list, encoded: dict[str, dict[str, list[EncodedPairs]]], log,
                         rows: list[TextRow] | None = None) -> None:
    """Refuse (one DataError listing every model, word and row) text that a model's tokenizer reads as its
    unknown token, unless ``data.allow_unknown_tokens``; then log the same lines and go on. A dataset run
    passes every row of its file (``rows``): a row the split leaves out is checked too."""
    data = config.data
    lines = []
    for i, (m, tok) in enumerate(zip(config.models, tokenizers)):
        if tok is None:  # a task model reads task ids
            continue
        model = f"models.{i} ({m.name})"
        if rows is not None:
            lines += unknown_token_report(encode_text_rows(rows, tok).unknown, tok, model,
                                          f"data.dataset {data.dataset}")
            continue
        for split, per_variable in encoded.items():
            for v, encs in per_variable.items():
                lines += unknown_token_report(encs[i].unknown, tok, model,
                                              f"data.task {data.task} ({split} pairs of {v})", rows_name="pairs")
    if not lines:
        return
    if data.allow_unknown_tokens:
        log("data.allow_unknown_tokens: running with unknown tokens:\n" + "\n".join(f"  - {line}" for line in lines))
        return
    raise DataError(f"{len(lines)} word(s) a model reads as its unknown token (the text it reads is not the one "
                    "written):\n" + "\n".join(f"  - {line}" for line in lines) + f"\n{UNKNOWN_TOKENS_FIX}")


def encode_pairs(config, tokenizers: list, log) -> tuple[dict[str, dict[str, list[EncodedPairs]]], bool]:
    """{split: {variable: [pairs in model i's token space]}} and whether they are stepwise; words a model reads
    as its unknown token are refused (`check_unknown_tokens`)."""
    from ..tasks.binding import get_text_task

    data = config.data
    encoded: dict[str, dict[str, list[EncodedPairs]]] = {}
    if data.dataset is not None:
        all_rows = load_dataset(data.dataset)
        check_unknown_tokens(config, tokenizers, encoded, log, rows=all_rows)
        rows = split_rows(all_rows, data.n_train, data.n_valid, config.seed)
        for split, part in rows.items():
            encoded[split] = {"full": [encode_text_rows(part, tok) for tok in tokenizers]}
        log(f"data.dataset {data.dataset}: {len(rows['train'])} train / {len(rows['valid'])} valid rows")
        return encoded, False
    task = get_text_task(data.task)
    for split, n in (("train", data.n_train), ("valid", data.n_valid)):
        rng = np.random.default_rng([config.seed, SPLIT_IDS[split]])
        base = task.sample(n, rng)
        encoded[split] = {}
        for v in config.variables:
            pairs = _natural_length_pairs(task, base, v, n, rng, data)
            encoded[split][v] = [encode_task_pairs(task, pairs, base, tok) for tok in tokenizers]
    check_unknown_tokens(config, tokenizers, encoded, log)
    log(f"data.task {task.name}: {data.n_train} train / {data.n_valid} valid pairs per variable "
        f"({'stepwise' if data.stepwise else 'indywise'})")
    return encoded, bool(data.stepwise)


def _load_model(m, index: int, device: str, log):
    """(model, backend, site, width) of one model entry."""
    if m.kind == "task":
        from ..backends.torch_hooks import TorchHookBackend, get_module
        from ..models.registry import load_task_model
        from ..models.task_models import build_task_model
        from ..sites import resolve_site

        model = load_task_model(m.name).to(device)
        if m.untrained:  # control: same architecture, fresh random weights
            settings = dict(model.config)
            arch, task_name, vocab = settings.pop("arch"), settings.pop("task_name"), settings.pop("vocab_size")
            settings.pop("seed", None)
            model = build_task_model(arch, task_name, vocab, seed=10_000 + index, **settings)
            model.eval().requires_grad_(False).to(device)
        site = resolve_site(model, m.site)
        get_module(model, site)
        return model, TorchHookBackend(), site, int(model.d_model)
    from ..llm.loading import load_causal_lm

    model, _ = load_causal_lm(m.name, dtype=m.dtype, device=device, adapter=m.adapter)
    backend = get_backend(m.backend)
    site = backend.resolve(model, m.site)
    log(f"models.{index}: {m.name} ({m.dtype}, {device}, backend {m.backend}, site {site})")
    return model, backend, site, int(model.config.hidden_size)


def build_counterfactual_problem(config, *, shard: Shard | None = None,
                                 log: Callable[[str], None] | None = None) -> CounterfactualProblem:
    """Read the dataset (or draw the task's pairs), encode them per model, load the models, cache the
    source latents. Bad rows and markers are reported before any model weights load."""
    from ..llm.loading import parse_device
    from ..tasks.binding import get_text_task

    log = log or (lambda s: None)
    if shard is not None and shard.world > 1:
        raise ConfigError("counterfactual runs are single-process; run them with `llm-mas mas`")
    problems = counterfactual_problems(config)
    if config.data.task is not None:
        task_name = get_text_task(config.data.task).name
        for i, m in enumerate(config.models):
            if m.kind == "task" and _task_model_task(m.name) != task_name:
                problems.append(f"models.{i}: {m.name!r} is trained on task {_task_model_task(m.name)!r}, not "
                                f"data.task {task_name!r}")
    if problems:
        raise ConfigError(problems)
    tokenizers = [_load_tokenizer(m.name) if m.kind == "hf" else None for m in config.models]
    encoded, stepwise = encode_pairs(config, tokenizers, log)
    entries = []
    for i, (m, name) in enumerate(zip(config.models, _names(config))):
        device = parse_device(getattr(m, "device", None) or config.device)
        model, backend, site, width = _load_model(m, i, device, log)
        entries.append(CounterfactualModelEntry(name=name, model=model, site=site, width=width, kind=m.kind,
                                                tokenizer=tokenizers[i], backend=backend,
                                                device=torch.device(device)))
    widths = [e.width for e in entries]
    k = config.k if config.k is not None else min(widths) // 2
    if not 1 <= k <= min(widths):
        raise ConfigError(f"k={k} must lie in 1..{min(widths)} (the smallest latent width among the models)")
    return CounterfactualProblem(entries, config.variables, k, encoded, stepwise=stepwise,
                                 train_directions=config.train_directions(), seed=config.seed,
                                 intervention=config.intervention, eval_batch_size=config.eval.batch_size)
