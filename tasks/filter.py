"""The filter stage: quality signals as columns, then a cheap selection.

The rule families are registered in `refinery.tasks.quality.FAMILIES`; this stage derives everything from
that list, so it names no family itself.

Step 1 (signals, cached): every enabled rule family's signals are computed
once per document it judges (null for the others: C4's rules, say, judge web
pages only) and written to `signals-NNNNN.parquet`, one per input file.
`signals.key.json` records the input files' checksums and, per enabled family,
the settings that change signals and the document kinds it judges; when they
match, the step is skipped, so changing only a threshold re-runs only step 2.

Step 2 (selection): each document is compared with the thresholds of the
families in registry order (decontamination and safety first, on every format);
the first rule it fails names its drop reason. A family judges prose, code,
or all documents. Each document has a kind, from its format or its source
(`source_kinds`): `web` (HTML, WARC, dataset records), `document` (what a user
brings: text, Markdown, PDF, office files) or `code`; a kind's profile
(`profiles`) switches families off or moves thresholds for that kind only, so
the web-crawl rules of C4 and FineWeb judge web pages, not a user's own
documentation. A profile's thresholds are selection settings: changing one
re-runs only step 2 (switching a family on or off for a kind recomputes its
signals). Kept documents carry
`lang`, `lang_score` and the signal columns, with PII replaced by placeholders;
dropped ones go to `dropped.parquet`. `drop_reasons.png` charts the drops by reason.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from tqdm import tqdm

from refinery.storage.atomic import TMP_PREFIX, atomic_path, atomic_write_json
from refinery.storage.documents import (
    DROPPED_SCHEMA,
    ParquetWriter,
    PartWriter,
    count_rows,
    document_files,
    dropped_rows,
    iter_batches,
)
from refinery.storage.manifest import Counts, OutputFile, StageResult, describe_file, file_sha256
from refinery.tasks.parallel import map_in_order
from refinery.tasks.pii import KINDS as PII_KINDS
from refinery.tasks.pii import PIIRules, redact
from refinery.tasks.quality import FAMILIES, RuleFamily, compute_signals
from refinery.tasks.quality.language import LanguageRules
from refinery.tasks.quality.secrets import may_hold_secrets

STAGE = "filter"
SIGNALS_KEY = "signals.key.json"
SIGNALS_VERSION = 6  # 2: words as str.split() gives them (no empty token at either end); 3: lid.176 by default;
# 4: prose recheck; 5: the recheck only where it can change a decision (a kept document's lang_score may be lower);
# 6: a family's signals only for the documents it judges (null elsewhere)
CHART = "drop_reasons.png"
MAX_SIGNAL_THREADS = 4  # in-process signal threads: beyond a few, the GIL-bound parts only wait for each other


class BaseFilterConfig(BaseModel):
    """What every `FilterConfig` shares; `filter_config_model` adds one section per registered family."""

    model_config = ConfigDict(extra="forbid")

    # Declared for type checkers only: `filter_config_model` adds them after the family sections, so that
    # dumped configs list the families first.
    if TYPE_CHECKING:
        pii: PIIRules
        code_formats: list[str]
        document_formats: list[str]
        source_kinds: dict[str, Kind]
        profiles: dict[Kind, dict[str, dict[str, Any]]]
        batch_size: int
        batch_bytes: int

    def families(self) -> dict[str, RuleFamily]:
        """The enabled rule families, by name, in the order their rules are checked."""
        out: dict[str, RuleFamily] = {}
        for name in type(self).model_fields:
            section = getattr(self, name)
            if isinstance(section, RuleFamily) and section.active():
                out[name] = section
        return out

    def kinds(
        self, formats: Sequence[str] | pa.Array | pa.ChunkedArray, sources: Sequence[str] | None = None
    ) -> np.ndarray:
        """The kind of each document: its source's kind in `source_kinds`, else its format's."""
        fmt = formats if isinstance(formats, pa.Array | pa.ChunkedArray) else pa.array(list(formats), pa.string())
        out = np.full(len(fmt), "web", dtype=object)
        out[_is_in(fmt, self.document_formats)] = "document"
        out[_is_in(fmt, self.code_formats)] = "code"
        if self.source_kinds and sources is not None:
            prefixes = sorted(((_as_uri(k), v) for k, v in self.source_kinds.items()), key=lambda kv: -len(kv[0]))
            for i, src in enumerate(sources):
                for prefix, kind in prefixes:  # the longest matching prefix wins
                    if src == prefix or src.startswith(prefix.rstrip("/") + "/") or src.startswith(prefix + "#"):
                        out[i] = kind
                        break
        return out

    def for_kind(self, name: str, kind: str) -> RuleFamily | None:
        """Family `name` as it judges documents of `kind` (its profile applied), or None when switched off."""
        family = getattr(self, name)
        override = self.profiles.get(kind, {}).get(name)  # type: ignore[call-overload]
        if override:
            family = type(family).model_validate({**family.model_dump(), **override})
        return family if family.active() else None

    @model_validator(mode="after")
    def _check_profiles(self) -> BaseFilterConfig:
        for kind, families in self.profiles.items():
            for name, override in families.items():
                section = getattr(self, name, None)
                if not isinstance(section, RuleFamily):
                    raise ValueError(f"filter.profiles.{kind}: {name!r} is not a rule family")
                unknown = set(override) - set(type(section).model_fields)
                if unknown:
                    raise ValueError(f"filter.profiles.{kind}.{name}: unknown settings {sorted(unknown)}")
                signal = set(override) & set(section.signal_fields)
                if signal:
                    raise ValueError(
                        f"filter.profiles.{kind}.{name}: {sorted(signal)} change how signals are computed, "
                        "which is the same for every kind; set them in filter.{name}"
                    )
                self.for_kind(name, kind)  # validates the values
        return self

    def signal_families(self) -> dict[str, RuleFamily]:
        """`families()` as the signals are computed: the language recheck limited to where it can decide.

        Its prose recheck runs only below the highest language threshold of any kind (profiles included) and for
        the languages some kind keeps; the rest of the documents are decided the same without it.
        """
        out = self.families()
        lang = out.get("language")
        if isinstance(lang, LanguageRules):
            judged = [lang] + [
                f for kind in self.profiles if isinstance(f := self.for_kind("language", kind), LanguageRules)
            ]
            out["language"] = lang.decisive_recheck([f.threshold for f in judged], [f.languages for f in judged])
        return out

    def judged_kinds(self) -> dict[str, tuple[str, ...]]:
        """Per enabled family, the document kinds it judges (its `applies_to`, its profiles): its signals are
        computed for documents of those kinds only."""
        out: dict[str, tuple[str, ...]] = {}
        for name, family in self.families().items():
            out[name] = tuple(k for k in APPLIES_TO_KINDS[family.applies_to] if self.for_kind(name, k) is not None)
        return out

    def judged_rows(
        self, kinds: np.ndarray, judged_kinds: Mapping[str, tuple[str, ...]] | None = None
    ) -> dict[str, np.ndarray]:
        """Per family that does not judge every kind, which of the documents of `kinds` it judges
        (`judged_kinds` is `self.judged_kinds()`, when the caller has it)."""
        judged_kinds = self.judged_kinds() if judged_kinds is None else judged_kinds
        return {name: np.isin(kinds, judged) for name, judged in judged_kinds.items() if judged != KINDS}

    def signal_key(self) -> dict[str, Any]:
        """What the cached signals depend on besides the input: enabled families, their signal settings, and
        which documents each computes for (the kinds it judges, and what decides a document's kind)."""
        key: dict[str, Any] = {
            "families": {name: rules.signal_params() for name, rules in self.signal_families().items()}
        }
        partial = {name: list(judged) for name, judged in self.judged_kinds().items() if judged != KINDS}
        if partial:
            key["judged"] = partial
            key["kinds"] = {"code_formats": sorted(self.code_formats), "document_formats": sorted(self.document_formats),
                            "source_kinds": dict(sorted(self.source_kinds.items()))}
        return key


Kind = Literal["web", "document", "code"]
KINDS: tuple[str, ...] = ("web", "document", "code")
# The kinds of document a family's `applies_to` covers, before profiles switch it off for some.
APPLIES_TO_KINDS: dict[str, tuple[str, ...]] = {"prose": ("web", "document"), "code": ("code",), "all": KINDS}
# Formats a user brings rather than crawls: judged by the `document` profile.
DOCUMENT_FORMATS = ("text", "markdown", "rst", "pdf", "docx", "pptx", "odt", "rtf", "epub", "image")
# The `document` profile: C4's and FineWeb's rules were fitted to web crawls (five sentences, no curly
# brackets, few duplicated or list-like lines) and drop clean documentation, licences and READMEs; the
# Gopher rules stay, with word-level thresholds loosened for code samples, URLs and tables in prose.
# lid.176 is unsure of English prose full of code samples, tables of constants or API names (a fifth of the
# clean documents of the held-out corpus scored under 0.65, down to 0.16), so documents get a lower language
# threshold than FineWeb's 0.65 for web pages; another language still fails, whatever its score. Chosen on a
# held-out corpus of documentation and junk (tests/test_filter_profiles.py).
DEFAULT_PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "document": {
        "language": {"threshold": 0.3},
        "c4": {"enabled": False},
        "fineweb": {"enabled": False},
        "gopher_quality": {"min_alpha_words_frac": 0.6, "max_mean_word_length": 15.0, "min_stop_words": 1,
                           "max_symbol_word_ratio": 0.3},
    },
}


def _is_in(values: pa.Array | pa.ChunkedArray, listed: Sequence[str]) -> np.ndarray:
    """Whether each value is one of `listed`, as a numpy mask (null is not listed)."""
    hit = pc.is_in(values, value_set=pa.array(list(listed), pa.string())).fill_null(False)
    return np.asarray(hit.to_numpy(zero_copy_only=False), bool)


# What a text must contain for `refinery.tasks.pii.redact` to replace anything besides secrets (those are
# `may_hold_secrets`): "@" for an e-mail address; two digits in a row for a card, an IBAN, a phone in
# brackets or most IPv4 addresses; "+digit" for an international phone; "digit.digit" for IPv4; two colons
# around at most four hex digits for IPv6. Python's `\d` is any Unicode decimal digit, hence `\p{Nd}`.
# One Arrow scan per batch decides which kept documents are searched in Python; it must stay a superset
# of the detectors in `refinery.tasks.pii`.
PII_HINTS = r"@|\p{Nd}\p{Nd}|\+\p{Nd}|\p{Nd}\.\p{Nd}|:[0-9A-Fa-f]{0,4}:"


def may_hold_pii(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """False for each text in which PII redaction can replace nothing (secrets included)."""
    hit = pc.match_substring_regex(texts, PII_HINTS).fill_null(False)
    return np.asarray(hit.to_numpy(zero_copy_only=False), bool) | may_hold_secrets(texts)


def redact_column(
    texts: pa.ChunkedArray, is_code: np.ndarray, rules: PIIRules, counts: Counter[str]
) -> pa.ChunkedArray | pa.Array:
    """`texts` with PII replaced; only texts that may hold some are converted to Python and searched."""
    candidates = np.flatnonzero(may_hold_pii(texts))
    if not len(candidates):
        return texts
    values = texts.take(pa.array(candidates)).to_pylist()
    changed: dict[int, str] = {}
    for j, i in enumerate(candidates.tolist()):
        red, found = redact(values[j], rules, is_code=bool(is_code[i]))
        counts.update(found)
        if red != values[j]:
            changed[i] = red
    if not changed:
        return texts
    out = texts.to_pylist()
    for i, red in changed.items():
        out[i] = red
    return pa.array(out, texts.type)


def _as_uri(source: str) -> str:
    """A source as the URI its documents carry (`file:///...` for a local path)."""
    if "://" in source:
        return source
    return Path(source).expanduser().resolve().as_uri()


def filter_config_model(families: Sequence[type[RuleFamily]]) -> type[BaseFilterConfig]:
    """The `FilterConfig` model for `families`: one section per family, then the stage's own settings."""
    own: dict[str, Any] = {
        "pii": (PIIRules, Field(default_factory=PIIRules)),
        "code_formats": (
            list[str], Field(default_factory=lambda: ["code"], description="formats that get the code rules")
        ),
        "document_formats": (
            list[str],
            Field(default_factory=lambda: list(DOCUMENT_FORMATS),
                  description="formats judged as documents a user brings (profile `document`); others are `web`"),
        ),
        "source_kinds": (
            dict[str, Kind],
            Field(default_factory=dict, description="a source (folder, file or URI) -> the kind of all its documents"),
        ),
        "profiles": (
            dict[Kind, dict[str, dict[str, Any]]],
            Field(default_factory=lambda: json.loads(json.dumps(DEFAULT_PROFILES)),
                  description="per kind: family -> settings that replace the family's for documents of that kind"),
        ),
        "batch_size": (
            int,
            Field(10_000, ge=1, description="documents per batch at most: words and their look-ups are shared in a batch"),
        ),
        "batch_bytes": (
            int,
            Field(32 * 2**20, ge=1, description="and about this much text per batch at most, for long documents"),
        ),
    }
    sections: dict[str, Any] = {}
    for family in families:
        if family.name in sections or family.name in own:
            raise ValueError(f"rule family name {family.name!r} ({family.__name__}) is already taken")
        sections[family.name] = (family, Field(default_factory=family))
    return create_model(
        "FilterConfig",
        __base__=BaseFilterConfig,
        __module__=__name__,
        __doc__="Settings of the filter stage: one section per rule family, each with `enabled` and its thresholds.",
        **sections,
        **own,
    )


FilterConfig = filter_config_model(FAMILIES)


@contextmanager
def registered(*families: type[RuleFamily]) -> Iterator[type[BaseFilterConfig]]:
    """Register rule families for the duration of a block (a test, an experiment), after the others.

    `FAMILIES` and this module's `FilterConfig` include them inside the block and are restored after it, so
    code that looks up `refinery.tasks.filter.FilterConfig` when it runs sees them. A family meant to stay is
    one line in `FAMILIES` instead.
    """
    global FilterConfig
    saved_families, saved_config = list(FAMILIES), FilterConfig
    FAMILIES.extend(families)
    try:
        FilterConfig = filter_config_model(FAMILIES)
        yield FilterConfig
    finally:
        FAMILIES[:] = saved_families
        FilterConfig = saved_config


def _signals_path(stage_dir: Path, i: int) -> Path:
    return stage_dir / f"signals-{i:05d}.parquet"


def _signals_batch(
    file_index: int,
    ids: pa.Array,
    texts: pa.Array,
    families: Mapping[str, RuleFamily],
    inputs: Mapping[str, pa.Array] | None = None,
    judged: Mapping[str, np.ndarray] | None = None,
) -> tuple[int, pa.Table]:
    columns = {"id": ids, **compute_signals(texts, families, inputs, judged)}
    return file_index, pa.table(columns)


def signal_threads() -> int:
    """Threads computing signals in process: the CPUs this process may run on, at most `MAX_SIGNAL_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_SIGNAL_THREADS))


WARM_UP_TEXTS = [
    "A short paragraph of English prose. It has two sentences, and a list:\n- one item\n- another item",
    "Ünïcode prose, with accents and punctuation… Ça marche bien, n'est-ce pas ?",
    "def f(x):\n    return x + 1\n",
]


def compile_loops() -> float:
    """Compile every compiled loop of the default families once, or load them from numba's cache.

    Compiling takes tens of seconds and numba caches the result beside the sources, so the installer
    calls this (scripts/install.sh, the Dockerfile) rather than leaving it to a user's first
    run. Returns the seconds it took."""
    t0 = time.perf_counter()
    families = FilterConfig().signal_families()
    texts = pa.array(WARM_UP_TEXTS, pa.large_string())
    inputs = {c: pa.array(["{}"] * len(texts)) for rules in families.values() for c in rules.inputs}
    compute_signals(texts, families, inputs)
    return time.perf_counter() - t0


def _signals_key(input_files: list[Path], cfg: BaseFilterConfig) -> dict[str, Any]:
    return {
        "version": SIGNALS_VERSION,
        "inputs": [[p.name, file_sha256(p)] for p in input_files],
        "signals": cfg.signal_key(),
    }


def signal_batches(
    input_files: list[Path], stage_dir: Path, cfg: BaseFilterConfig, executor: Executor | None
) -> tuple[bool, Iterator[tuple[int, pa.Table, pa.Table]]]:
    """Whether the cached signals match, and each input batch (all its columns) with its signals, in order.

    Matching signals are read from `signals-NNNNN.parquet`. Otherwise they are computed (through `executor`,
    else threads of this process) and written there as they arrive, the key last, once every file is whole;
    the caller decides on each batch while the next ones are computed.
    """
    key = _signals_key(input_files, cfg)
    key_path = stage_dir / SIGNALS_KEY
    files = [_signals_path(stage_dir, i) for i in range(len(input_files))]
    if key_path.is_file() and all(f.is_file() for f in files):
        if json.loads(key_path.read_text()) == json.loads(json.dumps(key)):
            return True, _cached_batches(input_files, files, cfg)
    key_path.unlink(missing_ok=True)  # the old cache no longer describes the files about to be written
    return False, _computed_batches(input_files, stage_dir, cfg, executor, key)


def batch_rows(path: Path, cfg: BaseFilterConfig) -> int:
    """Documents per batch for one input file: `batch_size`, fewer where its texts average more than
    `batch_bytes / batch_size` bytes (read from the Parquet footer, so nothing is scanned).

    Large batches make the shared work cheap (each distinct word of a batch is split, looked up and scored
    once), and the byte bound keeps a batch of long documents within memory.
    """
    meta = pq.ParquetFile(path).metadata
    rows = meta.num_rows
    if not rows:
        return cfg.batch_size
    names = [meta.schema.column(j).path for j in range(meta.num_columns)]
    if "text" not in names:
        return cfg.batch_size
    j = names.index("text")
    text_bytes = sum(meta.row_group(g).column(j).total_uncompressed_size for g in range(meta.num_row_groups))
    return max(1, min(cfg.batch_size, cfg.batch_bytes * rows // max(text_bytes, 1)))


def _cached_batches(
    input_files: list[Path], files: list[Path], cfg: BaseFilterConfig
) -> Iterator[tuple[int, pa.Table, pa.Table]]:
    for i, path in enumerate(input_files):
        signals = pq.read_table(files[i])
        offset = 0
        for batch in iter_batches([path], batch_size=batch_rows(path, cfg)):
            table = pa.Table.from_batches([batch])
            yield i, table, signals.slice(offset, table.num_rows)
            offset += table.num_rows


def _computed_batches(
    input_files: list[Path], stage_dir: Path, cfg: BaseFilterConfig, executor: Executor | None, key: dict[str, Any]
) -> Iterator[tuple[int, pa.Table, pa.Table]]:
    families = cfg.signal_families()
    inputs = sorted({c for rules in families.values() for c in rules.inputs} - {"id", "text"})
    files = [_signals_path(stage_dir, i) for i in range(len(input_files))]
    judged_kinds = cfg.judged_kinds()
    waiting: deque[pa.Table] = deque()  # batches handed out whose signals have not come back yet

    def items() -> Iterator[tuple[Any, ...]]:
        for i, path in enumerate(input_files):
            for batch in iter_batches([path], batch_size=batch_rows(path, cfg)):
                table = pa.Table.from_batches([batch])
                waiting.append(table)
                cols = {c: batch.column(c) for c in inputs}
                sources = batch.column("source").to_pylist() if cfg.source_kinds else None
                judged = cfg.judged_rows(cfg.kinds(batch.column("format"), sources), judged_kinds)
                yield (i, batch.column("id"), batch.column("text"), families, cols, judged)

    writers: dict[int, ParquetWriter] = {}
    # In process, batches go to threads: the language pass, Arrow's kernels and the compiled loops of the families
    # run without the GIL, so a second core does real work; results come back in order, so files are identical.
    threads = ThreadPoolExecutor(signal_threads()) if executor is None and signal_threads() > 1 else None
    try:
        for i, signals in map_in_order(_signals_batch, items(), executor or threads):
            if i not in writers:
                writers[i] = ParquetWriter(files[i])
            writers[i].write(signals)
            yield i, waiting.popleft(), signals
    finally:
        if threads is not None:
            threads.shutdown(cancel_futures=True)
    for i, f in enumerate(files):
        if i in writers:
            writers[i].close()
        else:  # an empty input file still gets a (empty) signals file
            with atomic_path(f) as tmp:
                pq.write_table(pa.table({"id": pa.array([], pa.string())}), tmp)
    for stale in stage_dir.glob("signals-*.parquet"):
        if stale not in files and not stale.name.startswith(TMP_PREFIX):
            stale.unlink()
    atomic_write_json(stage_dir / SIGNALS_KEY, key)


def compute_signal_files(
    input_files: list[Path], stage_dir: Path, cfg: BaseFilterConfig, progress: bool, executor: Executor | None
) -> bool:
    """Write `signals-NNNNN.parquet` per input file unless the cached ones match; True if they were reused."""
    reused, batches = signal_batches(input_files, stage_dir, cfg, executor)
    if not reused:
        bar = tqdm(total=count_rows(input_files), desc="filter: signals", unit="doc", disable=not progress)
        for _, table, _ in batches:
            bar.update(table.num_rows)
        bar.close()
    return reused


def select(
    signals: pa.Table,
    formats: Sequence[str] | pa.Array | pa.ChunkedArray,
    cfg: BaseFilterConfig,
    sources: list[str] | None = None,
) -> tuple[list[str | None], list[str]]:
    """The drop reason (None to keep) and a detail for each row, from signal columns and thresholds.

    Each family judges the rows of each kind with that kind's profile applied.
    """
    n = len(formats)  # not signals.num_rows: a table with no signal columns has no rows
    reason: list[str | None] = [None] * n
    detail = [""] * n
    undecided = np.ones(n, bool)
    kinds = cfg.kinds(formats, sources)
    judged_kinds = cfg.judged_kinds()
    present = [k for k in KINDS if (kinds == k).any()]
    for name in cfg.families():
        for kind in present:
            family = cfg.for_kind(name, kind)
            if kind not in judged_kinds[name] or family is None:
                continue
            applies = kinds == kind
            for rule in family.rules:
                limit = getattr(family, rule.limit)
                if limit is None:  # a threshold set to null: the signal is kept as a flag, nothing is dropped
                    continue
                fails, describe = family.check(rule, signals, limit)
                hit = np.flatnonzero(fails & applies & undecided)
                for i in hit:
                    reason[i] = rule.code
                    detail[i] = describe(i)
                undecided[hit] = False
    return reason, detail


def run_filter(
    input_files: list[Path],
    stage_dir: Path,
    cfg: BaseFilterConfig,
    progress: bool = True,
    executor: Executor | None = None,
) -> StageResult:
    """Compute (or reuse) quality signals for `input_files`, then keep, redact and drop documents."""
    t0 = time.perf_counter()
    input_files = [Path(p) for p in input_files]
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    previous_parts = set(document_files(stage_dir))
    reused, batches = signal_batches(input_files, stage_dir, cfg, executor)
    parts = PartWriter(stage_dir)
    dropped_w = ParquetWriter(stage_dir / "dropped.parquet", DROPPED_SCHEMA)
    dropped: Counter[str] = Counter()
    pii_counts: Counter[str] = Counter()
    n_in = 0
    t_select = 0.0  # this thread's time deciding and writing, while the next batches' signals are computed
    desc = "filter: select (signals reused)" if reused else "filter: signals and select"
    bar = tqdm(total=count_rows(input_files), desc=desc, unit="doc", disable=not progress)
    for i, table, sig in batches:
        t_batch = time.perf_counter()
        if sig.column("id") != table.column("id"):
            raise RuntimeError(f"{_signals_path(stage_dir, i)} is out of step with {input_files[i]}; delete it and re-run")
        sources = table.column("source").to_pylist() if cfg.source_kinds else None
        reason, detail = select(sig, table.column("format"), cfg, sources)
        keep = np.fromiter((r is None for r in reason), bool, len(reason))
        owned = [c for c in sig.column_names if c != "id"]
        table = table.drop_columns([c for c in owned if c in table.column_names])
        for c in owned:
            table = table.append_column(c, sig.column(c))
        kept = table.filter(pa.array(keep))
        if cfg.pii.enabled and kept.num_rows:
            idx = kept.column_names.index("text")
            is_code = _is_in(kept.column("format"), cfg.code_formats)
            texts = redact_column(kept.column("text"), is_code, cfg.pii, pii_counts)
            kept = kept.set_column(idx, kept.schema.field(idx), texts)
        parts.write(kept)
        drop = np.flatnonzero(~keep)
        if len(drop):
            taken = pa.array(drop)
            dropped_w.write(
                dropped_rows(
                    table.column("id").take(taken).to_pylist(), table.column("source").take(taken).to_pylist(),
                    STAGE, [reason[j] for j in drop], [detail[j] for j in drop],  # type: ignore[misc]
                )
            )
            dropped.update(reason[j] for j in drop)  # type: ignore[misc]
        n_in += table.num_rows
        bar.update(table.num_rows)
        t_select += time.perf_counter() - t_batch
    bar.close()
    t_signals = time.perf_counter()
    outputs: list[OutputFile] = list(parts.close())
    kept_rows = sum(o.rows for o in outputs)
    outputs.append(dropped_w.close(stage_dir))
    for stale in previous_parts - {stage_dir / o.path for o in outputs}:
        stale.unlink(missing_ok=True)
    write_chart(stage_dir / CHART, dict(dropped))
    outputs.append(describe_file(stage_dir, stage_dir / CHART))
    for j in range(len(input_files)):
        p = _signals_path(stage_dir, j)
        outputs.append(describe_file(stage_dir, p, pq.ParquetFile(p).metadata.num_rows))
    outputs.append(describe_file(stage_dir, stage_dir / SIGNALS_KEY))

    counts = Counts(**{"in": n_in}, kept=kept_rows, dropped=dict(sorted(dropped.items())))
    counts.check(STAGE)
    by_family = dropped_by_family(dict(dropped), cfg)
    elapsed = time.perf_counter() - t0
    metrics: dict[str, float] = {
        "docs_per_s": n_in / elapsed if elapsed > 0 else 0.0,
        "seconds_signals": t_signals - t0 - t_select,  # reading or computing signals, apart from the decisions
        "seconds_select": t_select + time.perf_counter() - t_signals,
        "signals_reused": float(reused),
        **{f"dropped_{k}": float(v) for k, v in sorted(dropped.items())},
        **{f"dropped_family_{k}": float(v) for k, v in by_family.items()},
        **{f"pii_{k}": float(pii_counts.get(k, 0)) for k in PII_KINDS},
    }
    extra = {"chart": CHART, "dropped_by_family": by_family}
    return StageResult(outputs=outputs, counts=counts, metrics=metrics, extra=extra)


def dropped_by_family(dropped: Mapping[str, int], cfg: BaseFilterConfig) -> dict[str, int]:
    """Drops per enabled rule family (0 for a family that dropped nothing), so the report shows what each did."""
    family_of = {rule.code: name for name, family in cfg.families().items() for rule in family.rules}
    out = dict.fromkeys(cfg.families(), 0)
    for code, n in dropped.items():
        name = family_of.get(code, "other")
        out[name] = out.get(name, 0) + n
    return out


def write_chart(path: Path, dropped: dict[str, int]) -> None:
    """Horizontal bar chart of drop counts by reason, most frequent on top, as a PNG.

    Drawn with Pillow (already installed with matplotlib): importing matplotlib alone cost more than the
    rest of the stage's start-up, for a chart of a few bars.
    """
    from PIL import Image, ImageDraw, ImageFont

    items = sorted(dropped.items(), key=lambda kv: -kv[1])
    font, small, title = (ImageFont.load_default(size) for size in (12, 11, 14))
    row, top, bottom = 24, 40, 44
    label_w = max((int(font.getlength(k)) for k, _ in items), default=0)
    left, right = max(80, label_w + 16), 70
    width, height = max(640, left + 360 + right), top + row * max(len(items), 3) + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 12), "filter: drops by reason", fill="black", font=title, anchor="mt")
    axis_y, span = height - bottom, width - left - right
    draw.line([(left, top - 6), (left, axis_y), (width - right, axis_y)], fill="#444444")
    draw.text((left + span / 2, height - 16), "documents dropped", fill="black", font=font, anchor="mm")
    if not items:
        draw.text((left + span / 2, (top + axis_y) / 2), "no documents dropped", fill="black", font=font, anchor="mm")
    biggest = max((v for _, v in items), default=1) or 1
    for i, (reason, count) in enumerate(items):
        y = top + i * row + row / 2
        end = left + span * count / biggest
        draw.rectangle([left, y - 8, max(end, left + 1), y + 8], fill="#4c72b0")
        draw.text((left - 8, y), reason, fill="black", font=font, anchor="rm")
        draw.text((end + 5, y), f"{count:,}", fill="black", font=small, anchor="lm")
    for value in (0, biggest):
        x = left + span * value / biggest
        draw.line([(x, axis_y), (x, axis_y + 4)], fill="#444444")
        draw.text((x, axis_y + 6), f"{value:,}", fill="black", font=small, anchor="mt")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
