"""Toxicity case-study data: Jigsaw toxic comments, Anthropic HH-RLHF and ToxicChat (docs/method.md §15).

Every source is read through ``datasets``, either from its hub name or from a local CSV / TSV / JSONL /
parquet file, labelled *toxic* or *nontoxic* by the source's own rule, formatted with the source's template,
de-duplicated, balanced per source, shuffled with a seed and cut into ``n_splits`` disjoint splits::

    from llm_mas.toxicity.data import toxicity_corpus
    corpus = toxicity_corpus("toxic", split=0, data="sample")      # the shipped offline sample
    corpus = toxicity_corpus("nontoxic", split=2, data="hub")      # the paper's data (needs the hub)
    corpus = toxicity_corpus("both", split=1, data={"jigsaw": "train.csv", "hh": "hub"})
    texts = list(corpus)            # list[str]; corpus.labels / corpus.sources are parallel lists
    print(corpus.summary())         # counts per source and label: read, dropped (why), kept, per split

Sources, their columns and label rules (``SOURCES``):

=========  ===================================  ==========================================  ====================
source     hub name (config)                    columns of a local file                     template
=========  ===================================  ==========================================  ====================
jigsaw     ``anitamaxvim/jigsaw-toxic-comments``  ``comment_text``, ``toxic``, ``severe_toxic``,  ``Assistant: {comment_text}``
                                                ``obscene``, ``threat``, ``insult``,
                                                ``identity_hate``
hh         ``Anthropic/hh-rlhf``                ``chosen``, ``rejected``                    ``{chosen}`` / ``{rejected}``
toxicchat  ``lmsys/toxic-chat`` (toxicchat0124)   ``user_input``, ``model_output``,            ``Human: {user_input}\\nAssistant: {model_output}``
                                                ``toxicity``, ``jailbreaking``
=========  ===================================  ==========================================  ====================

- jigsaw: toxic if any of the six labels > 0; nontoxic if all six are 0; rows whose labels are all <= 0 but
  not all 0 (Kaggle's -1 = "not scored") or missing are *unlabelled* and dropped (counted).
- hh: every row gives two texts: ``rejected`` is toxic, ``chosen`` nontoxic (a row with chosen == rejected
  gives one text with both labels: dropped as a label conflict, counted).
- toxicchat: toxic if toxicity > 0 or jailbreaking > 0; nontoxic if toxicity == 0 **and** jailbreaking == 0.
  (The reference also calls a jailbreak with toxicity == 0 nontoxic, so one text could land in both the
  toxic and the nontoxic fine-tunes; here the labels are exclusive.)

A *labelled* local file is the other accepted layout: columns ``text`` (already formatted, used as is),
``label`` (``toxic``/``nontoxic`` or 1/0) and optionally ``source``. The shipped offline sample
``llm_mas/data/toxicity/sample.jsonl`` is one (``data="sample"``; see ``llm_mas/data/toxicity/README.md``).

Splits: within every (source, label) stratum the texts are shuffled with a seed derived from
``(seed, source, label)`` and cut into ``n_splits`` contiguous near-equal chunks; split k is the union of
the k-th chunks, shuffled again. Hence splits are disjoint and cover the data, each split is balanced per
source (after balancing, a source's two strata have equal size and so equal chunk sizes), mode "both" of
split k is exactly toxic ∪ nontoxic of split k, and adding a source never moves another source's texts
to a different split. Exact duplicate texts are kept once (counted); a text seen with both labels is
dropped everywhere (counted).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from ..errors import ConfigError, DataError, HubUnavailableError, choice_error
from ..resources import package_path

LABELS = ("toxic", "nontoxic")
MODES = ("toxic", "nontoxic", "both")
SAMPLE_PATH = package_path("data", "toxicity", "sample.jsonl")  # the shipped offline sample (package data)
LABELLED_COLUMNS = ("text", "label")  # + optional "source"
LOCAL_SOURCE = "local"  # source name of labelled-file rows without a `source` column
FILE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
JIGSAW_LABEL_COLUMNS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

DataSpec = Union[str, Path, Mapping[str, Union[str, Path]]]


@dataclass(frozen=True)
class Example:
    """One formatted text with its source and label."""

    source: str
    label: str  # "toxic" | "nontoxic"
    text: str


@dataclass(frozen=True)
class ToxicitySource:
    """How one data source is found, labelled and formatted."""

    name: str
    hub_id: str
    hub_config: str | None
    columns: tuple[str, ...]            # required columns of a native local file / hub split
    template: str                       # how a text is formatted (documentation; see `convert`)
    rule: str                           # the label rule in words
    hub_splits: Mapping[str, tuple[str, ...]]  # role ("train"/"test") -> split names tried in order
    convert: Callable[[dict[str, list], str, Counter], list[Example]] = field(repr=False, compare=False)


# ------------------------------------------------------------------------------------------- labels
def _number(value: Any, column: str, row: int, where: str) -> float | None:
    """A label value as a float; None for missing (None/NaN/empty). Anything else non-numeric: DataError."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else float(value)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            return None if math.isnan(number) else number
    raise DataError(f"{where}: column {column!r}, row {row}: label value {value!r} is not a number; "
                    f"{column!r} must hold 0/1 (or another number, > 0 meaning yes)")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _convert_jigsaw(table: dict[str, list], where: str, dropped: Counter) -> list[Example]:
    out = []
    for i, comment in enumerate(table["comment_text"]):
        comment = _text(comment)
        if not comment.strip():
            dropped["jigsaw", "empty text"] += 1
            continue
        values = [_number(table[c][i], c, i, where) for c in JIGSAW_LABEL_COLUMNS]
        if any(v is not None and v > 0 for v in values):
            label = "toxic"
        elif all(v == 0 for v in values):
            label = "nontoxic"
        else:
            dropped["jigsaw", "unlabelled (labels missing or negative)"] += 1
            continue
        out.append(Example("jigsaw", label, f"Assistant: {comment}"))
    return out


def _convert_hh(table: dict[str, list], where: str, dropped: Counter) -> list[Example]:
    out = []
    for chosen, rejected in zip(table["chosen"], table["rejected"], strict=True):
        for label, text in (("toxic", _text(rejected)), ("nontoxic", _text(chosen))):
            if not text.strip():
                dropped["hh", "empty text"] += 1
                continue
            out.append(Example("hh", label, text))
    return out


def _convert_toxicchat(table: dict[str, list], where: str, dropped: Counter) -> list[Example]:
    out = []
    for i, (user, reply) in enumerate(zip(table["user_input"], table["model_output"], strict=True)):
        user, reply = _text(user), _text(reply)
        if not user.strip() and not reply.strip():
            dropped["toxicchat", "empty text"] += 1
            continue
        toxicity = _number(table["toxicity"][i], "toxicity", i, where)
        jailbreaking = _number(table["jailbreaking"][i], "jailbreaking", i, where)
        if (toxicity is not None and toxicity > 0) or (jailbreaking is not None and jailbreaking > 0):
            label = "toxic"
        elif toxicity == 0 and jailbreaking == 0:
            label = "nontoxic"
        else:
            dropped["toxicchat", "unlabelled (labels missing or negative)"] += 1
            continue
        out.append(Example("toxicchat", label, f"Human: {user}\nAssistant: {reply}"))
    return out


SOURCES: dict[str, ToxicitySource] = {
    "jigsaw": ToxicitySource(
        name="jigsaw", hub_id="anitamaxvim/jigsaw-toxic-comments", hub_config=None,
        columns=("comment_text", *JIGSAW_LABEL_COLUMNS), template="Assistant: {comment_text}",
        rule="toxic if any of toxic/severe_toxic/obscene/threat/insult/identity_hate > 0, nontoxic if all are 0",
        hub_splits={"train": ("train", "full_train"), "test": ("test",)}, convert=_convert_jigsaw),
    "hh": ToxicitySource(
        name="hh", hub_id="Anthropic/hh-rlhf", hub_config=None, columns=("chosen", "rejected"),
        template="{rejected} (toxic) / {chosen} (nontoxic)",
        rule="rejected transcript = toxic, chosen transcript = nontoxic",
        hub_splits={"train": ("train",), "test": ("test",)}, convert=_convert_hh),
    "toxicchat": ToxicitySource(
        name="toxicchat", hub_id="lmsys/toxic-chat", hub_config="toxicchat0124",
        columns=("user_input", "model_output", "toxicity", "jailbreaking"),
        template="Human: {user_input}\\nAssistant: {model_output}",
        rule="toxic if toxicity > 0 or jailbreaking > 0, nontoxic if toxicity == 0 and jailbreaking == 0",
        hub_splits={"train": ("train",), "test": ("test",)}, convert=_convert_toxicchat),
}


def layouts_help(source: str | None = None) -> str:
    """The accepted local-file layouts, for error messages."""
    names = [source] if source in SOURCES else list(SOURCES)
    native = "; ".join(f"{n}: {', '.join(SOURCES[n].columns)}" for n in names)
    return (f"a native file with the columns {native}, or a labelled file with the columns "
            f"{', '.join(LABELLED_COLUMNS)} (+ optional source); formats: "
            f"{', '.join(sorted(FILE_SUFFIXES))}")


# ------------------------------------------------------------------------------------------- reading
def read_table(path: str | Path) -> dict[str, list]:
    """Read a local CSV / TSV / JSON(L) / parquet file through ``datasets``: column name -> values."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    builder = FILE_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {str(path)!r} has an unsupported suffix {path.suffix!r}; use one of "
                        f"{', '.join(sorted(FILE_SUFFIXES))}")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; give an existing file with "
                        f"{layouts_help()}")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    progress_was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(f"data file {str(path)!r} could not be read as {builder}: {cause}") from e
    finally:
        if progress_was_enabled:
            datasets.utils.logging.enable_progress_bar()
    return dataset.to_dict()


def load_hub_table(source: str, role: str = "train") -> tuple[dict[str, list], str]:
    """Download (or take from the local HF cache) one source's ``role`` split: (columns, description)."""
    import datasets

    spec = SOURCES[source]
    name = spec.hub_id + (f" ({spec.hub_config})" if spec.hub_config else "")
    try:
        splits = datasets.load_dataset(spec.hub_id, spec.hub_config)
    except OSError as e:  # ConnectionError (offline / unreachable), DatasetNotFoundError (gated, missing)
        raise HubUnavailableError(
            f"cannot load {name} from the Hugging Face hub ({type(e).__name__}: {e}). Download it where the "
            f"hub is reachable and pass a local file instead: data={{'{source}': PATH}} / "
            f"--data {source}=PATH with {layouts_help(source)}; or use the shipped offline sample: "
            f"--data sample") from e
    for split in spec.hub_splits[role]:
        if split in splits:
            return splits[split].to_dict(), f"hub:{spec.hub_id}[{split}]"
    raise DataError(f"{name} on the hub has the splits {', '.join(splits)}, none of "
                    f"{', '.join(spec.hub_splits[role])} (wanted for role {role!r}); pass a local file instead")


def _check_columns(table: dict[str, list], required: Sequence[str], where: str, source: str | None) -> None:
    missing = [c for c in required if c not in table]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} (found: {', '.join(table) or 'none'}); "
                        f"expected {layouts_help(source)}")


def _parse_label(value: Any, row: int, where: str) -> str:
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return value.strip().lower()
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and value.strip() in ("0", "1")):
        number = float(value)
        if number in (0.0, 1.0):
            return "toxic" if number == 1.0 else "nontoxic"
    raise DataError(f"{where}: column 'label', row {row}: {value!r} is not a label; use 'toxic'/'nontoxic' "
                    f"or 1/0")


def _convert_labelled(table: dict[str, list], where: str, source: str | None,
                      dropped: Counter) -> list[Example]:
    out = []
    sources = table.get("source")
    for i, (text, label) in enumerate(zip(table["text"], table["label"], strict=True)):
        text = _text(text)
        row_source = source or (str(sources[i]) if sources is not None and sources[i] else LOCAL_SOURCE)
        if not text.strip():
            dropped[row_source, "empty text"] += 1
            continue
        out.append(Example(row_source, _parse_label(label, i, where), text))
    return out


def _native_source(table: dict[str, list]) -> str | None:
    """The source whose native columns the table has (None if none)."""
    matches = [n for n, s in SOURCES.items() if all(c in table for c in s.columns)]
    return matches[0] if len(matches) == 1 else None


def parse_data_spec(data: DataSpec, sources: Sequence[str] | None) -> list[tuple[str | None, str]]:
    """Normalise a data spec into ``[(source or None, "hub" | file path), ...]``.

    ``data`` is ``"hub"`` (every selected source from the hub), ``"sample"`` (the shipped sample), a file
    path, ``"jigsaw=a.csv,hh=hub"`` or a mapping ``{source: "hub" | path}``.
    """
    selected = list(sources) if sources is not None else list(SOURCES)
    if isinstance(data, Mapping):
        entries = [(str(k), str(v)) for k, v in data.items()]
    elif isinstance(data, Path):
        return [(None, str(data))]
    elif data == "hub":
        unknown = [s for s in selected if s not in SOURCES]
        if unknown:
            raise choice_error("hub source", unknown[0], SOURCES)
        return [(s, "hub") for s in selected]
    elif data == "sample":
        return [(None, str(SAMPLE_PATH))]
    elif "=" in data and not Path(data).exists():
        entries = []
        for part in data.split(","):
            name, sep, location = part.partition("=")
            if not sep or not name.strip() or not location.strip():
                raise ConfigError(f"data entry {part!r} must look like SOURCE=PATH or SOURCE=hub "
                                  f"(e.g. jigsaw=train.csv,hh=hub)")
            entries.append((name.strip(), location.strip()))
    else:
        return [(None, str(data))]
    problems = []
    for name, location in entries:
        if location == "hub" and name not in SOURCES:
            problems.append(str(choice_error("hub source", name, SOURCES)))
        if sources is not None and name not in selected:
            problems.append(f"data names source {name!r}, which is not among the selected sources "
                            f"{', '.join(selected)}; add it to sources or drop it from data")
    if problems:
        raise ConfigError(problems)
    return entries


# ------------------------------------------------------------------------------------------- report
@dataclass
class SourceCounts:
    """What happened to one source's rows on their way into the corpus."""

    source: str
    origins: list[str] = field(default_factory=list)       # "hub:<id>[split]" or file paths
    toxic: int = 0                                          # labelled toxic (after de-duplication)
    nontoxic: int = 0
    dropped: dict[str, int] = field(default_factory=dict)   # reason -> count (before balancing)
    kept_toxic: int = 0                                     # after balancing
    kept_nontoxic: int = 0
    split_toxic: list[int] = field(default_factory=list)    # per split, after balancing
    split_nontoxic: list[int] = field(default_factory=list)


@dataclass
class ToxicityCorpus(Sequence[str]):
    """The texts of one split and mode (a sequence of str) plus a record of how they were made."""

    texts: list[str]
    labels: list[str]
    sources: list[str]
    mode: str
    split: int | None
    n_splits: int
    seed: int
    balance: bool
    counts: dict[str, SourceCounts]
    excluded: dict[str, int] = field(default_factory=dict)  # rows of sources that were not selected

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index):  # type: ignore[override]
        return self.texts[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def label_counts(self) -> dict[str, dict[str, int]]:
        """{source: {label: n}} for the texts of this corpus."""
        out: dict[str, dict[str, int]] = {}
        for source, label in zip(self.sources, self.labels, strict=True):
            out.setdefault(source, {"toxic": 0, "nontoxic": 0})[label] += 1
        return out

    def report(self) -> dict[str, Any]:
        """Plain-data record (for JSON): selection, per-source counts, and this corpus's counts."""
        return {"mode": self.mode, "split": self.split, "n_splits": self.n_splits, "seed": self.seed,
                "balance": self.balance, "n_texts": len(self.texts), "selected": self.label_counts(),
                "sources": {k: asdict(v) for k, v in self.counts.items()}, "excluded": dict(self.excluded)}

    def summary(self) -> str:
        """A small table: per source, labelled / kept / per-split counts and drop reasons."""
        head = (f"toxicity corpus: mode={self.mode} split={self.split}/{self.n_splits} seed={self.seed} "
                f"balance={self.balance} -> {len(self.texts)} texts")
        lines = [head, f"{'source':<10} {'toxic':>8} {'nontoxic':>9} {'kept t/n':>15}  per split (t/n)  dropped"]
        for name, c in self.counts.items():
            per_split = " ".join(f"{t}/{n}" for t, n in zip(c.split_toxic, c.split_nontoxic, strict=True))
            dropped = ", ".join(f"{k}: {v}" for k, v in c.dropped.items()) or "-"
            lines.append(f"{name:<10} {c.toxic:>8} {c.nontoxic:>9} {f'{c.kept_toxic}/{c.kept_nontoxic}':>15}  "
                         f"{per_split}  {dropped}")
        if self.excluded:
            lines.append("excluded (source not selected): "
                         + ", ".join(f"{k}: {v}" for k, v in self.excluded.items()))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.report(), indent=2)


# ------------------------------------------------------------------------------------------- pipeline
def load_examples(data: DataSpec = "hub", sources: Sequence[str] | None = None, role: str = "train"
                  ) -> tuple[list[Example], dict[str, SourceCounts], dict[str, int]]:
    """Read, label and format every selected source; de-duplicate.

    Returns (examples in load order, counts per source, rows excluded per unselected source).
    ``role`` picks the hub split ("train" or "test"); local files are used whole.
    """
    if role not in ("train", "test"):
        raise choice_error("data role", role, ("train", "test"))
    selected = None if sources is None else list(sources)
    examples: list[Example] = []
    counts: dict[str, SourceCounts] = {}
    excluded: Counter = Counter()

    def record(source: str) -> SourceCounts:
        return counts.setdefault(source, SourceCounts(source))

    for source, location in parse_data_spec(data, selected):
        dropped: Counter = Counter()  # (source, reason) -> rows
        if location == "hub":
            assert source is not None
            table, where = load_hub_table(source, role)
            _check_columns(table, SOURCES[source].columns, where, source)
            found = SOURCES[source].convert(table, where, dropped)
        else:
            where = location
            table = read_table(location)
            native = source if source in SOURCES and all(c in table for c in SOURCES[source].columns) else None
            if native is None and source is None:
                native = _native_source(table)
            if native is not None:
                source = native
                found = SOURCES[native].convert(table, where, dropped)
            else:
                _check_columns(table, LABELLED_COLUMNS, where, source)
                found = _convert_labelled(table, where, source, dropped)
        present = ({source} if source is not None else set()) | {e.source for e in found} | {
            name for name, _ in dropped}
        for name in sorted(present):
            if selected is None or name in selected:
                record(name).origins.append(where)
        for example in found:
            if selected is not None and example.source not in selected:
                excluded[example.source] += 1
            else:
                examples.append(example)
        for (name, reason), n in dropped.items():
            if selected is None or name in selected:
                record(name).dropped[reason] = record(name).dropped.get(reason, 0) + n
    examples = _deduplicate(examples, counts)
    order = [s for s in SOURCES if s in counts] + sorted(s for s in counts if s not in SOURCES)
    counts = {name: counts[name] for name in order}
    for example in examples:
        setattr(record(example.source), example.label, getattr(record(example.source), example.label) + 1)
    return examples, counts, dict(excluded)


def _deduplicate(examples: list[Example], counts: dict[str, SourceCounts]) -> list[Example]:
    """Keep the first copy of each text; drop texts that carry both labels (counted per source)."""
    labels_of: dict[str, set[str]] = {}
    for example in examples:
        labels_of.setdefault(example.text, set()).add(example.label)
    seen: set[str] = set()
    out = []
    for example in examples:
        dropped = counts.setdefault(example.source, SourceCounts(example.source)).dropped
        if len(labels_of[example.text]) > 1:
            dropped["text has both labels"] = dropped.get("text has both labels", 0) + 1
        elif example.text in seen:
            dropped["duplicate text"] = dropped.get("duplicate text", 0) + 1
        else:
            seen.add(example.text)
            out.append(example)
    return out


def _shuffled(items: list[Example], *key: object) -> list[Example]:
    # random.Random seeded with a str hashes it with SHA-512: stable across processes and PYTHONHASHSEED
    rng = random.Random("|".join(map(str, key)))
    items = list(items)
    rng.shuffle(items)
    return items


def _chunks(items: list[Example], n: int) -> list[list[Example]]:
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


def split_examples(examples: list[Example], counts: dict[str, SourceCounts], *, n_splits: int = 3,
                   seed: int = 42, balance: bool = True) -> list[dict[str, list[Example]]]:
    """Balance per source, shuffle per (source, label) and cut into ``n_splits`` stratified chunks.

    Returns, per split, {label: examples}; fills the kept/per-split fields of ``counts``.
    """
    strata: dict[tuple[str, str], list[Example]] = {}
    for example in examples:
        strata.setdefault((example.source, example.label), []).append(example)
    splits: list[dict[str, list[Example]]] = [{"toxic": [], "nontoxic": []} for _ in range(n_splits)]
    for source in counts:
        by_label = {label: _shuffled(strata.get((source, label), []), seed, source, label) for label in LABELS}
        sizes = {label: len(items) for label, items in by_label.items()}
        if balance:
            if min(sizes.values()) == 0 and max(sizes.values()) > 0:
                raise DataError(f"source {source!r} has {sizes['toxic']} toxic and {sizes['nontoxic']} nontoxic "
                                f"texts; balancing would drop all of them. Add the missing class or pass "
                                f"balance=False (--no-balance)")
            keep = min(sizes.values())
            by_label = {label: items[:keep] for label, items in by_label.items()}
        c = counts[source]
        c.kept_toxic, c.kept_nontoxic = len(by_label["toxic"]), len(by_label["nontoxic"])
        for label in LABELS:
            chunks = _chunks(by_label[label], n_splits)
            setattr(c, f"split_{label}", [len(chunk) for chunk in chunks])
            for k, chunk in enumerate(chunks):
                splits[k][label].extend(chunk)
    return splits


def toxicity_corpus(mode: str = "both", split: int | None = 0, n_splits: int = 3, *,
                    sources: Sequence[str] | None = None, data: DataSpec = "hub", seed: int = 42,
                    balance: bool = True, role: str = "train") -> ToxicityCorpus:
    """The texts of split ``split`` (0-based; None = all splits) for ``mode`` toxic / nontoxic / both.

    sources:  source names to use (default: every source the data provide; for "hub" all three).
    data:     "hub", "sample", a file, "jigsaw=a.csv,hh=hub" or {source: "hub" | path} (module docstring).
    seed:     drives balancing, the stratum shuffles and the order within a split.
    balance:  downsample the larger label of each source to the size of the smaller one.
    role:     "train" or "test" hub split.
    Raises ConfigError for bad arguments, DataError for bad files / empty results, HubUnavailableError
    when the hub is needed but unreachable.
    """
    problems = []
    if mode not in MODES:
        problems.append(str(choice_error("mode", mode, MODES)))
    if not isinstance(n_splits, int) or n_splits < 1:
        problems.append(f"n_splits={n_splits!r} must be an integer >= 1")
    elif split is not None and not (isinstance(split, int) and 0 <= split < n_splits):
        problems.append(f"split={split!r} must be an integer in 0..{n_splits - 1} (or None for all splits)")
    if problems:
        raise ConfigError(problems)
    examples, counts, excluded = load_examples(data, sources, role)
    if not examples:
        raise DataError(f"no usable texts in data={data!r} for sources={sources!r} "
                        f"(dropped: {json.dumps({k: v.dropped for k, v in counts.items()})}, "
                        f"excluded: {excluded})")
    splits = split_examples(examples, counts, n_splits=n_splits, seed=seed, balance=balance)
    labels = LABELS if mode == "both" else (mode,)
    chosen = range(n_splits) if split is None else [split]
    selected = [e for k in chosen for label in labels for e in splits[k][label]]
    selected = _shuffled(selected, seed, "split", split, mode)
    if not selected:
        raise DataError(f"split {split} of {n_splits} has no {mode} texts; counts per source: "
                        + "; ".join(f"{k}: {v.kept_toxic} toxic / {v.kept_nontoxic} nontoxic kept"
                                    for k, v in counts.items())
                        + ". Use fewer splits or more data")
    return ToxicityCorpus(texts=[e.text for e in selected], labels=[e.label for e in selected],
                          sources=[e.source for e in selected], mode=mode, split=split, n_splits=n_splits,
                          seed=seed, balance=balance, counts=counts, excluded=excluded)
