"""What a rule family is: settings, signals, rules and the documents they apply to, in one class.

A family computes signals (pure functions of a document: word counts, ratios, language scores) once per
batch as columns; its `rules` then say, for each reason code, which column is compared with which of its
settings. The filter stage caches the signals and re-runs only the cheap comparison when a threshold changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from refinery.tasks.quality._text import Lines, Words, simple_texts

# Which documents a family's rules judge: prose (every format except the code formats), code, or all.
AppliesTo = Literal["prose", "code", "all"]
Op = Literal["min", "max", "flag"]
SIGN = {"min": "<", "max": ">", "flag": "="}


@dataclass(frozen=True)
class Rule:
    """One reason code: drop a document when the signal `column` compares badly with the setting `limit`."""

    code: str
    column: str
    op: Op  # min: drop below; max: drop above; flag: drop when true (and the setting is true)
    limit: str  # a settings field of the family; a `None` value there turns the rule off
    detail_column: str | None = None  # a signal column shown in the drop's detail (e.g. the matched span)


class Batch:
    """A batch of documents as signal functions see it; views several families share are built once."""

    def __init__(self, texts: pa.Array, columns: Mapping[str, pa.Array] | None = None) -> None:
        self.arr = texts.cast(pa.large_string())
        self._columns = dict(columns or {})

    def __len__(self) -> int:
        return len(self.arr)

    @functools.cached_property
    def texts(self) -> list[str]:
        return self.arr.to_pylist()

    @functools.cached_property
    def words(self) -> Words:
        """Whitespace words (Gopher's definition), split with Arrow once for every family that counts words."""
        return Words.split(self.arr)

    @functools.cached_property
    def simple(self) -> np.ndarray:
        """Which texts the line rules judge vectorised (`_text.NOT_SIMPLE`); the rest take Python."""
        return simple_texts(self.arr)

    @functools.cached_property
    def lines(self) -> Lines:
        """The lines of the simple texts, split once for every family with line rules."""
        return Lines.split(self.arr, self.simple)

    def subset(self, idx: np.ndarray) -> Batch:
        """The documents at `idx`, with their other columns, as a batch of their own."""
        taken = pa.array(idx, pa.int64())
        return Batch(self.arr.take(taken), {name: col.take(taken) for name, col in self._columns.items()})

    def column(self, name: str) -> list[Any] | None:
        """Another document column (one a family lists in `inputs`) as Python values; None when not given."""
        col = self._columns.get(name)
        return col.to_pylist() if col is not None else None


Check = tuple[np.ndarray, Callable[[int], str]]


class RuleFamily(BaseModel):
    """A rule family: its settings are the fields (`enabled` and thresholds); the class says the rest.

    A subclass sets `name` (its config section, `filter.<name>`), `applies_to`, `rules`, `signal_fields`
    (the settings that change signals rather than only thresholds, so changing one recomputes the cached
    signals) and implements `signals`. Registering it is one line in `refinery.tasks.quality.FAMILIES`.
    """

    model_config = ConfigDict(extra="forbid")

    name: ClassVar[str]
    applies_to: ClassVar[AppliesTo] = "prose"
    rules: ClassVar[tuple[Rule, ...]] = ()  # checked in this order; a document counts under the first it fails
    signal_fields: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[tuple[str, ...]] = ()  # document columns besides `text` that `signals` reads

    enabled: bool = True

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Catch a misspelt setting or comparison when the family is defined, not when a document fails."""
        super().__pydantic_init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return
        where = f"rule family {cls.__name__} ({cls.name!r})"
        if cls.applies_to not in get_args(AppliesTo):
            raise TypeError(f"{where}: applies_to must be one of {get_args(AppliesTo)}, not {cls.applies_to!r}")
        for f in cls.signal_fields:
            if f not in cls.model_fields:
                raise TypeError(f"{where}: signal field {f!r} is not one of its settings")
        for rule in cls.rules:
            if rule.limit not in cls.model_fields:
                raise TypeError(f"{where}: rule {rule.code!r} names setting {rule.limit!r}, which it does not have")
            if rule.op not in get_args(Op):
                raise TypeError(f"{where}: rule {rule.code!r} has op {rule.op!r}, not one of {get_args(Op)}")

    def active(self) -> bool:
        """Whether the family runs (a family may also need settings, e.g. evaluation sets, to apply)."""
        return self.enabled

    def signal_params(self) -> dict[str, Any]:
        """What the cached signals depend on besides the input documents (part of `signals.key.json`)."""
        return {f: getattr(self, f) for f in self.signal_fields}

    def signals(self, batch: Batch) -> dict[str, Any]:
        """The family's signal columns for a batch (numpy or Arrow arrays, one value per document)."""
        raise NotImplementedError(f"rule family {type(self).__name__} computes no signals")

    def check(self, rule: Rule, signals: pa.Table, limit: Any) -> Check:
        """Which rows fail `rule`, and the detail of a failing row: `column=value > limit=x`."""
        col = signals.column(rule.column).to_numpy(zero_copy_only=False)
        if rule.op == "flag":
            fails = col.astype(bool) & bool(limit)
        elif rule.op == "min":
            fails = col < limit
        else:
            fails = col > limit
        values: list[Any] = []  # the signal column as Python values, converted on the first failing row
        shown: list[Any] = []  # the detail column likewise
        head, tail = f"{rule.column}=", f" {SIGN[rule.op]} {rule.limit}={limit}"

        def detail(i: int) -> str:
            if not values:
                values.extend(col.tolist())
            v = values[i]
            text = head + (f"{v:.4g}" if isinstance(v, float) else str(v)) + tail
            if rule.detail_column:
                if not shown:
                    shown.extend(signals.column(rule.detail_column).to_pylist())
                if shown[i]:
                    text += f" ({rule.detail_column}={shown[i]!r})"
            return text

        return fails, detail


def compute_signals(
    texts: pa.Array,
    families: Mapping[str, RuleFamily],
    columns: Mapping[str, pa.Array] | None = None,
    judged: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every signal column of `families` (enabled ones by name, in check order) for a batch of texts.

    Pure, so it runs in any worker. `columns` holds the other document columns families ask for in `inputs`.
    `judged` holds, per family, a mask of the documents it judges (absent: all of them); its signals are
    computed for those alone and are null elsewhere. Families with the same mask share one sub-batch.
    """
    batch = Batch(texts, columns)
    subsets: dict[bytes, tuple[np.ndarray, Batch]] = {}
    out: dict[str, Any] = {}
    for name, rules in families.items():
        mask = None if judged is None else judged.get(name)
        if mask is None or mask.all():
            out.update(rules.signals(batch))
            continue
        key = np.packbits(mask).tobytes()
        if key not in subsets:
            idx = np.flatnonzero(mask)
            # With no document to judge, one is computed all the same: it gives the columns their types.
            subsets[key] = idx, batch.subset(idx if len(idx) else np.arange(1))
        idx, sub = subsets[key]
        out.update({col: spread(values, idx, len(batch)) for col, values in rules.signals(sub).items()})
    return out


def spread(values: Any, idx: np.ndarray, n: int) -> pa.Array:
    """A column computed for documents `idx` of a batch of `n`, as `n` values with nulls elsewhere."""
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
    pos = np.full(n, -1, np.int64)
    pos[idx] = np.arange(len(idx))
    return arr.take(pa.array(pos, mask=pos < 0))
