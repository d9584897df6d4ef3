"""The shards stage: encode the curated corpus into Arrow token shards.

The corpus is streamed from Parquet one row group at a time; each row group is
a unit of pure work (read, encode, flatten to one token array) that runs
in-process, on a pool of processes of our own (`workers`), or on an executor
the caller passes (a Dask cluster), with at most a few units in flight so
memory stays bounded whatever the corpus size. The main process routes the
documents, in corpus order, to the `train` or `val` split (a hash of the text)
and cuts each split into shards of about `shard_tokens` tokens.

Encoding runs through the fastest encoder that reproduces the reference ids
exactly. The reference is `tokenizers` (`encode_batch_fast`, special-token text
encoded as plain text); `gigatoken` (then `fastokens`) is much faster but a
different implementation, so before a corpus is encoded a parity gate compares
them on a deterministic sample of the corpus's own documents and on adversarial
strings (all Unicode planes, combining marks, emoji, RTL, whitespace and
control runs, NUL, the tokenizer's special tokens inside text, very long words,
digit runs). The first fast encoder that matches on every input encodes the
corpus; if none does, or the fast libraries are missing or cannot load the
tokenizer, the reference encodes it, with a warning naming the first input that
differed, so the shard bytes are the same whichever encoder ran. The reference
is slow, so it encodes the gate's inputs once, in one call, while the first fast
encoder loads and encodes them on another thread, and the verdict is remembered
for the rest of the process, keyed by the tokenizer file's sha256, the
libraries' versions and the sample: a second run over the same tokenizer and
corpus does not compare again.

The rest of the stage keeps the tokens in flat arrays end to end: `gigatoken`
reads the texts straight from the Arrow buffers (no Python string per
document), the split is hashed from the same buffers, end-of-text ids are
placed with one mask, documents are routed to their split with a mask over the
tokens, and a shard's `list<uint16>` column is built from the flat values and
offsets. A full shard is written, and its sha256 taken from memory, on a thread
of its split while the next row groups encode; at the end of the corpus both
splits' last shards are written at once while `stats.parquet` is written.

Files written under the stage directory:
- `train-00000.arrow`, ..., `val-00000.arrow`: one row per document (`id`,
  `input_ids`), each document closed by the end-of-text token.
- `stats.parquet`: one row per encoded document (id, split, format, source,
  n_tokens, n_bytes), the end-of-text token counted in n_tokens.
- `dropped.parquet`: documents that produced no tokens (`empty_text`).

Resuming: shard contents depend only on the corpus, the tokenizer and the
config, never on timing, so a killed run can keep the shards it completed.
After each shard the stage records, in `progress/state.json`, how far into the
corpus each split is written; a re-run deletes anything newer than that record
and goes on from there, so no document is ever written twice and the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from refinery.storage.atomic import atomic_write_json, sweep_temporaries
from refinery.storage.documents import DROPPED_SCHEMA, ParquetWriter, dropped_rows
from refinery.storage.manifest import Counts, OutputFile, StageResult, describe_file, file_sha256, stable_hash
from refinery.storage.shards import (
    SHARD_SUFFIX,
    split_fraction,
    split_fractions,
    token_dtype,
    token_shard_bytes,
    write_shard_bytes,
)
from refinery.tasks.parallel import executor_workers, map_in_order
from refinery.tasks.tokenizer import EOT, load_tokenizer

STAGE = "shards"
SPLITS = ("train", "val")
PROGRESS_DIR = "progress"
STATE_FILE = "state.json"

STATS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("format", pa.string()),
        pa.field("source", pa.string()),
        pa.field("n_tokens", pa.int64()),
        pa.field("n_bytes", pa.int64()),
    ]
)
# Per-shard progress records also carry the dropped documents (reason is null for encoded ones).
_PENDING_SCHEMA = STATS_SCHEMA.append(pa.field("reason", pa.string()))


class ShardsConfig(BaseModel):
    """How the corpus is split, encoded and cut into shards."""

    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents (by text hash) in val")
    shard_tokens: int = Field(2**25, ge=1, description="a shard is closed once it holds at least this many tokens")
    batch_docs: int = Field(10_000, ge=1, description="documents per tokenizer call (at most a row group)")
    workers: int = Field(
        1, ge=1, le=512, description="1: encode in this process on the tokenizer's threads; n > 1: n processes"
    )
    in_flight: int = Field(2, ge=1, le=64, description="row groups queued per worker (bounds memory)")
    eot: str = Field(EOT, min_length=1, description="special token that closes every document")
    encoder: Literal["auto", "fast", "gigatoken", "fastokens", "tokenizers"] = Field(
        "auto",
        description="auto: the first fast encoder (gigatoken, then fastokens) that passes the parity gate, "
        "else tokenizers; fast: fail unless one passes; gigatoken, fastokens: that one, fail unless it passes; "
        "tokenizers: the reference only",
    )
    gate_docs: int = Field(200, ge=0, le=100_000, description="corpus documents the parity gate compares")


@dataclass(frozen=True)
class EncodeTask:
    """One Parquet row group to encode: a picklable unit of pure work."""

    path: str
    row_group: int
    first_doc: int  # position of its first document in the whole corpus
    tokenizer_file: str
    eot: str
    batch_docs: int
    val_fraction: float
    encoder: str = "tokenizers"  # a name in ENCODERS, chosen by the parity gate
    tokenizer_digest: str = ""  # sha256 of the tokenizer file: workers reload only when it changes


@dataclass
class EncodedBatch:
    """A row group, encoded: per-document columns plus every token in one flat array."""

    first_doc: int
    ids: pa.Array
    sources: pa.Array
    formats: pa.Array
    n_bytes: np.ndarray  # UTF-8 bytes of the text
    lengths: np.ndarray  # tokens per document, end-of-text included; 0 for an empty text
    values: np.ndarray  # concatenated tokens of all documents
    split: np.ndarray  # 0 for train, 1 for val (index into SPLITS)


# -- encoders ------------------------------------------------------------------------------------


class Encoder(Protocol):
    """Texts to token ids as one flat array: what the stage needs from a tokenizer library.

    An encoder that can also read an Arrow string array in place has `encode_arrow(texts)`, with the
    same result as `encode_flat(texts.to_pylist())`; `encode_texts` uses it when it is there.
    """

    name: str

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`(values, offsets)`: every text's ids concatenated, and `len(texts) + 1` int64 offsets."""
        ...


class TokenizersEncoder:
    """The reference: Hugging Face `tokenizers`, called exactly as the stage always has."""

    name = "tokenizers"

    def __init__(self, tokenizer_file: str | Path, eot: str = EOT) -> None:
        self.tok, self.eot_id = load_tokenizer(tokenizer_file, eot)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # Arrow converts the lists of ids in C++: one pass, no per-token Python iteration.
        lists = pa.array([enc.ids for enc in self.tok.encode_batch_fast(texts)], type=pa.list_(pa.uint32()))
        offsets = lists.offsets.to_numpy().astype(np.int64)
        return lists.values.to_numpy(zero_copy_only=False), offsets - offsets[0]


class FastokensEncoder:
    """`fastokens`: the same `tokenizer.json`, encoded in Rust straight into one flat buffer.

    `split_special_tokens=True` matches `encode_special_tokens = True` of the
    reference (a document quoting `<|endoftext|>` gets plain-text ids), and
    `add_special_tokens=True` matches `encode_batch_fast`'s default.
    """

    name = "fastokens"

    def __init__(self, tokenizer_file: str | Path) -> None:
        import fastokens

        self.tok = fastokens.Tokenizer.from_file(str(tokenizer_file))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, offsets = self.tok.encode_batch_flat(texts, add_special_tokens=True, split_special_tokens=True)
        return np.frombuffer(ids, np.uint32), np.frombuffer(offsets, np.uint64).astype(np.int64)


class GigatokenEncoder:
    """`gigatoken`: the same `tokenizer.json`, encoded in Rust on all cores, straight from Arrow's buffers.

    It reads a string column where Arrow holds it (an awkward view of the same
    buffers: no Python string per document) and returns one flat buffer plus
    offsets. It always splits special tokens out of the text, whereas the
    reference encodes their text as plain text, so it is loaded from the
    `tokenizer.json` without its special added tokens: a document quoting
    `<|endoftext|>` then gets the plain-text ids, as from the reference. The
    parity gate checks that (the special tokens inside text are among its inputs).
    """

    name = "gigatoken"

    def __init__(self, tokenizer_file: str | Path) -> None:
        import gigatoken

        data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
        data["added_tokens"] = [t for t in data.get("added_tokens") or [] if not t.get("special")]
        self.tok = gigatoken.Tokenizer.from_json(json.dumps(data))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._flat(self.tok.encode_batch(texts))

    def encode_arrow(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """`encode_flat` of a (large) string array without nulls, read in place from its buffers."""
        import awkward as ak

        if len(texts) == 0:
            return np.zeros(0, np.uint32), np.zeros(1, np.int64)
        if not pa.types.is_large_string(texts.type):
            texts = texts.cast(pa.large_string())  # gigatoken takes 64-bit offsets: copies the offsets only
        _, offsets, data = texts.buffers()
        offsets = np.frombuffer(offsets, np.int64)[texts.offset : texts.offset + len(texts) + 1]
        chars = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        strings = ak.contents.ListOffsetArray(
            ak.index.Index64(offsets),
            ak.contents.NumpyArray(chars, parameters={"__array__": "char"}),
            parameters={"__array__": "string"},
        )
        return self._flat(self.tok.encode_batch(ak.Array(strings)))

    @staticmethod
    def _flat(encoded: Any) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets from 0) of gigatoken's ragged result, views of its buffers where it allows."""
        import awkward as ak

        layout = encoded.layout
        if not isinstance(layout, ak.contents.ListOffsetArray):
            layout = ak.to_packed(encoded).layout.to_ListOffsetArray64(True)
        offsets = np.asarray(layout.offsets.data).astype(np.int64, copy=False)
        values = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
        return values.astype(np.uint32, copy=False), offsets - offsets[0]


ENCODERS = {"tokenizers": TokenizersEncoder, "gigatoken": GigatokenEncoder, "fastokens": FastokensEncoder}
# The fast encoders, the fastest first: the parity gate picks the first that reproduces the reference.
FAST_ENCODERS = ("gigatoken", "fastokens")

# The last encoder loaded of each kind, with what it was loaded from: (path, eot, digest of the file).
_ENCODERS: dict[str, tuple[tuple[str, str, str], Encoder]] = {}
_ENCODERS_LOCK = threading.Lock()  # guards the per-kind locks below
_ENCODER_LOCKS: dict[str, threading.Lock] = {}  # one per kind: loading one kind never waits for another


def _encoder(name: str, path: str, eot: str, digest: str = "") -> Encoder:
    """Load an encoder once per process: workers reuse it across tasks, and runs over the same tokenizer too.

    `digest` is the tokenizer file's sha256, so a file replaced at the same path is loaded again.
    One encoder of each kind is kept, so the parity gate's reference does not evict the fast one.
    """
    key = (path, eot, digest)
    with _ENCODERS_LOCK:
        lock = _ENCODER_LOCKS.setdefault(name, threading.Lock())
    with lock:
        cached = _ENCODERS.get(name)
        if cached is None or cached[0] != key:
            encoder = TokenizersEncoder(path, eot) if name == "tokenizers" else ENCODERS[name](path)
            cached = _ENCODERS[name] = (key, encoder)
        return cached[1]


@functools.lru_cache(maxsize=8)
def _vocab(path: str, eot: str, digest: str = "") -> tuple[int, int]:
    """(end-of-text id, vocabulary size with added tokens), read once per process and tokenizer file
    (from the reference encoder, which the parity gate loads anyway)."""
    reference = _encoder("tokenizers", path, eot, digest)
    assert isinstance(reference, TokenizersEncoder)
    return reference.eot_id, reference.tok.get_vocab_size(with_added_tokens=True)


def _warm_up(name: str, path: str, eot: str, digest: str) -> threading.Thread | None:
    """Load a fast encoder and run it once on a thread, unless this process already has it.

    Its first call pays one-time imports (a few tenths of a second for gigatoken's
    `awkward`); started before the corpus sample is read and the reference is
    loaded, that overlaps them. A failure is left for the parity gate to report.
    """
    if name not in ENCODERS or _ENCODERS.get(name, (None,))[0] == (path, eot, digest):
        return None

    def warm() -> None:
        try:
            _encoder(name, path, eot, digest).encode_flat([" "])
        except Exception:  # noqa: BLE001 (the gate loads it again and says why it failed)
            pass

    thread = threading.Thread(target=warm, name=f"encode-warm-{name}", daemon=True)
    thread.start()
    return thread


@functools.lru_cache(maxsize=1)
def _library_versions() -> str:
    """The versions of the encoding libraries (as installed when first asked; the loaded code does not
    change within a process): a new release of any must pass the gate again."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("tokenizers", *FAST_ENCODERS):
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ",".join(found)


# -- the parity gate --------------------------------------------------------------------------------


@dataclass
class GateResult:
    """What the parity gate decided, for the manifest and the warning."""

    encoder: str  # the encoder the stage will use
    checked: int = 0  # inputs compared (corpus sample plus adversarial strings)
    reason: str | None = None  # why the fast encoder was not used, or None

    def as_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "checked": self.checked, "fallback_reason": self.reason}


def adversarial_texts(special_tokens: list[str], seed: int = 0) -> list[str]:
    """Strings that tend to break tokenizer reimplementations, the same list on every call.

    Odd codepoints (noncharacters, private use, the last plane) stand in for lone
    surrogates, which a Python `str` from Parquet can never hold.
    """
    return list(_adversarial_texts(tuple(special_tokens), seed))


@functools.lru_cache(maxsize=4)
def _adversarial_texts(special_tokens: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """The list, built once per process: drawing it character by character in Python takes a while."""
    rng = random.Random(seed)
    ranges = [
        (0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF),
        (0x0300, 0x036F), (0x0590, 0x06FF), (0x1F300, 0x1FAFF), (0x4E00, 0x9FFF), (0x0E00, 0x0E7F),
    ]  # fmt: skip

    def random_text(n: int) -> str:
        out = []
        for _ in range(n):
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            out.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else " ")
        return "".join(out)

    texts = [
        " ", "  ", "\n", "\t", "\r\n", "\x00", "a\x00b", "\x00" * 50, " " * 5000, "\n" * 3000, "\t \r\n\v\f" * 200,
        "x" + " " * 777 + "y", "\u3000\u00a0\u2028\u2029\u200b\ufeff", "".join(chr(c) for c in range(32)) * 10,
        "0123456789" * 500, "3.14159 2,718 1e-10 -42 0x1F 1_000_000 ١٢٣٤٥ 一二三", "a" * 20000,
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10000)),
        "e\u0301\u0302\u0303\u0304" * 100, "👨‍👩‍👧‍👦🏳️‍🌈👍🏽🇫🇷" * 50, "שלום עולם مرحبا بالعالم \u202eRTL\u202c",
        "\ufffe\uffff\U0010ffff\U000e0001\ue000\U000f0000\ufdd0", "ǅǈ ﬁ Ⅻ ㎏ ＡＢＣ ½ ℌ", "I'm you'll we've 'S 'LL",
        "def f(x):\n\treturn x  # ünïcödé\r\n", "<|endoftext|", "|endoftext|>", "<||>",
    ]  # fmt: skip
    for token in special_tokens:
        texts += [token, f"before {token} after", f"{token}{token}", f" {token} ", f"x{token}\n{token}y", token * 50]
    texts += [random_text(rng.randint(1, 400)) for _ in range(120)]
    texts += [" ".join(random_text(rng.randint(1, 12)) for _ in range(60)) for _ in range(30)]
    return tuple(texts)


GATE_DOC_CHARS = 8000  # a longer document is compared on its first characters: the gate's cost stays bounded


def gate_sample(
    input_files: list[Path], n_docs: int, row_groups: int = 8, metadata: list[pq.FileMetaData] | None = None
) -> list[str]:
    """Up to `n_docs` non-empty texts of the corpus, the same on every run.

    Drawn from the first rows of at most `row_groups` row groups spread evenly over
    the corpus, so the gate reads a few pages whatever the corpus size; among those
    rows the documents are picked by a hash of their text, and the longest is always in.
    `metadata` (the files' Parquet footers, if the caller has them) saves reading them again.
    """
    if n_docs <= 0:
        return []
    if metadata is None:
        metadata = [pq.ParquetFile(p).metadata for p in input_files]
    units = [(p, m, rg) for p, m in zip(input_files, metadata, strict=True) for rg in range(m.num_row_groups)]
    if len(units) > row_groups:
        units = [units[round(i * (len(units) - 1) / (row_groups - 1))] for i in range(row_groups)]
    per_unit = -(-2 * n_docs // max(1, len(units)))  # twice what is needed, so the hash has a choice
    texts: list[str] = []
    for path, meta, rg in units:
        reader = pq.ParquetFile(path, metadata=meta)
        batches = reader.iter_batches(batch_size=per_unit, row_groups=[rg], columns=["text"])
        first = next(batches, None)
        if first is not None:
            texts += [t[:GATE_DOC_CHARS] for t in first.column(0).to_pylist() if t]
    if len(texts) <= n_docs:
        return texts
    longest = max(texts, key=len)
    picked = sorted((t for t in texts if t is not longest), key=lambda t: split_fraction(t, "encoder-gate"))
    return [longest, *picked[: n_docs - 1]]


# The last corpus sample drawn in this process, by the identity of its files (path, size, mtime) and size.
_SAMPLE: dict[str, list[str]] = {}
_SAMPLE_LOCK = threading.Lock()


def _corpus_sample(input_files: list[Path], metadata: list[pq.FileMetaData], n_docs: int) -> list[str]:
    """`gate_sample`, read once per process for the same files: a re-run then finds the gate's verdict
    without touching the corpus."""
    stats = [(str(p), st.st_size, st.st_mtime_ns) for p in input_files for st in [p.stat()]]
    key = stable_hash([stats, n_docs])
    with _SAMPLE_LOCK:
        if key in _SAMPLE:
            return _SAMPLE[key]
    sample = gate_sample(input_files, n_docs, metadata=metadata)
    with _SAMPLE_LOCK:
        _SAMPLE.clear()
        _SAMPLE[key] = sample
    return sample


def _texts_digest(texts: list[str]) -> str:
    """sha256 of a list of texts, each length-prefixed so that no two lists share a digest."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def first_mismatch(candidate: Encoder, reference: Encoder, texts: list[str]) -> str | None:
    """None when `candidate` gives the reference's ids for every text, else the first text that differs."""
    return _first_difference(candidate.encode_flat(texts), reference.encode_flat(texts), texts)


def _first_difference(
    got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], texts: list[str]
) -> str | None:
    """The first text whose ids differ between two `encode_flat` results, or None when all are equal."""
    (got_values, got_offsets), (want_values, want_offsets) = got, want
    if np.array_equal(got_offsets, want_offsets) and np.array_equal(got_values, want_values):
        return None
    for i, text in enumerate(texts):
        got_ids = got_values[got_offsets[i] : got_offsets[i + 1]] if i + 1 < len(got_offsets) else None
        if got_ids is None or not np.array_equal(got_ids, want_values[want_offsets[i] : want_offsets[i + 1]]):
            return text
    return texts[-1] if texts else ""


# Verdicts of the parity gate in this process, keyed by everything the verdict depends on.
_GATE_VERDICTS: dict[str, GateResult] = {}
_GATE_LOCK = threading.Lock()


def parity_gate(
    tokenizer_file: str | Path,
    eot: str,
    sample: list[str],
    mode: str = "auto",
    candidate: Encoder | None = None,
    tokenizer_digest: str | None = None,
) -> GateResult:
    """Decide which encoder encodes the corpus: a fast one only if it matches the reference exactly.

    `mode` is `ShardsConfig.encoder`: `auto` and `fast` try the fast encoders
    in order (`FAST_ENCODERS`), a library's name tries that one alone.
    `candidate` replaces the fast encoders (tests give it one that really
    disagrees). With `auto` a failed gate is a warning and the reference
    encodes; with any other mode it is an error.

    Given the tokenizer file's sha256 (`tokenizer_digest`), the verdict is
    remembered for the rest of the process, keyed by that digest, the
    end-of-text token, both libraries' versions and the sample itself: the
    reference encodes at a few MB/s, so the comparison can cost more than
    encoding a corpus with the fast encoder, and a second run over the same
    tokenizer and corpus would only repeat it to the same answer.
    """
    if mode == "tokenizers":
        return GateResult(encoder="tokenizers")
    names = FAST_ENCODERS if mode in ("auto", "fast") else (mode,)
    key = None
    if tokenizer_digest is not None and candidate is None:
        key = stable_hash([tokenizer_digest, eot, _library_versions(), names, _texts_digest(sample)])
        with _GATE_LOCK:
            cached = _GATE_VERDICTS.get(key)
        if cached is not None:
            return _gate_outcome(GateResult(**vars(cached)), mode)
    result = _run_gate(tokenizer_file, eot, sample, candidate, tokenizer_digest or "", names)
    if key is not None:
        with _GATE_LOCK:
            _GATE_VERDICTS[key] = GateResult(**vars(result))
    return _gate_outcome(result, mode)


def _run_gate(
    tokenizer_file: str | Path,
    eot: str,
    sample: list[str],
    candidate: Encoder | None,
    digest: str,
    names: tuple[str, ...] = FAST_ENCODERS,
) -> GateResult:
    """Compare the fast encoders with the reference on the sample and the adversarial strings.

    The reference encodes the inputs once, in one batch call; each fast encoder
    (the fastest first) is compared with that until one matches exactly. The
    first fast encoder is loaded and run on a second thread while the reference
    encodes: both release the GIL, and its first call pays one-time imports.
    """
    reference = _encoder("tokenizers", str(tokenizer_file), eot, digest)
    assert isinstance(reference, TokenizersEncoder)
    specials = [t.content for t in reference.tok.get_added_tokens_decoder().values()]
    texts = sample + adversarial_texts(specials)
    names = names if candidate is None else (candidate.name,)

    def fast_ids(name: str) -> tuple[Encoder, tuple[np.ndarray, np.ndarray]]:
        fast = candidate if candidate is not None else _encoder(name, str(tokenizer_file), eot, digest)
        return fast, fast.encode_flat(texts)

    with cf.ThreadPoolExecutor(1, thread_name_prefix="encode-gate") as ahead:
        first = ahead.submit(fast_ids, names[0])
        want = reference.encode_flat(texts)
    reasons: list[str] = []
    for name in names:
        try:
            fast, got = first.result() if name == names[0] else fast_ids(name)
            mismatch = _first_difference(got, want, texts)
        except Exception as err:  # noqa: BLE001 (missing library, unsupported tokenizer.json: try the next)
            reasons.append(f"{name} unavailable: {type(err).__name__}: {err}")
            continue
        if mismatch is None:
            return GateResult(encoder=fast.name, checked=len(texts))
        shown = mismatch if len(mismatch) <= 120 else mismatch[:120] + f"... ({len(mismatch)} characters)"
        reasons.append(f"{fast.name} ids differ from tokenizers on {shown!r}")
    return GateResult(encoder="tokenizers", checked=len(texts), reason="; ".join(reasons))


def _gate_outcome(result: GateResult, mode: str) -> GateResult:
    """A failed gate is a warning with `mode="auto"` (on every run, remembered or not), else an error."""
    if result.reason is None:
        return result
    if mode != "auto":
        raise RuntimeError(f"shards.encoder={mode} but no fast encoder passed the parity gate: {result.reason}")
    warnings.warn(
        f"shards: encoding with tokenizers instead of a fast encoder: {result.reason}", RuntimeWarning, stacklevel=3
    )
    return result


def close_documents(values: np.ndarray, offsets: np.ndarray, eot_id: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Append the end-of-text id to every document: `(values, lengths)` with the ids in `dtype`.

    Document d's end-of-text id lands at `offsets[d + 1] + d` (one id more per
    earlier document); a boolean mask places the tokens around them in one pass.
    """
    n = len(offsets) - 1
    lengths = np.diff(offsets) + 1
    out = np.empty(len(values) + n, dtype=dtype)
    ends = np.asarray(offsets[1:], dtype=np.int64) + np.arange(n, dtype=np.int64)
    out[ends] = eot_id
    is_token = np.ones(len(out), dtype=bool)
    is_token[ends] = False
    out[is_token] = values
    return out, lengths


def encode_texts(encoder: Encoder, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """`encoder.encode_flat` of an Arrow string array without nulls: from its buffers when the encoder
    reads Arrow (no Python string per document), else through Python strings."""
    encode_arrow = getattr(encoder, "encode_arrow", None)
    if encode_arrow is not None:
        return encode_arrow(texts)
    return encoder.encode_flat(texts.to_pylist())


def encode_row_group(task: EncodeTask) -> EncodedBatch:
    """Read one row group and encode it: the per-batch pure work of the stage."""
    encoder = _encoder(task.encoder, task.tokenizer_file, task.eot, task.tokenizer_digest)
    eot_id, vocab_size = _vocab(task.tokenizer_file, task.eot, task.tokenizer_digest)
    dtype = np.uint16 if token_dtype(vocab_size) == pa.uint16() else np.uint32
    table = pq.ParquetFile(task.path).read_row_group(task.row_group, columns=["id", "text", "source", "format"])
    text = table.column("text").combine_chunks()
    if text.null_count:  # a null text is an empty document (and splits as "")
        text = text.fill_null("")
    n_bytes = pc.binary_length(text).to_numpy(zero_copy_only=False).astype(np.int64)
    has_text = n_bytes > 0
    values: list[np.ndarray] = []
    kept_lengths: list[np.ndarray] = []
    for start in range(0, len(text), task.batch_docs):
        chunk = text.slice(start, task.batch_docs)
        nonempty = has_text[start : start + task.batch_docs]
        if not nonempty.all():  # empty documents are dropped, never encoded
            chunk = chunk.filter(pa.array(nonempty))
        if len(chunk):
            flat, offsets = encode_texts(encoder, chunk)
            closed, lens = close_documents(flat, offsets, eot_id, dtype)
            values.append(closed)
            kept_lengths.append(lens)
    lengths = np.zeros(len(text), dtype=np.int64)
    if kept_lengths:
        lengths[has_text] = np.concatenate(kept_lengths)
    return EncodedBatch(
        first_doc=task.first_doc,
        ids=table.column("id").combine_chunks(),
        sources=table.column("source").combine_chunks(),
        formats=table.column("format").combine_chunks(),
        n_bytes=n_bytes,
        lengths=lengths,
        values=values[0] if len(values) == 1 else np.concatenate(values) if values else np.zeros(0, dtype),
        # The same digest as `is_val` on each text, taken from the Arrow bytes (no str per document).
        split=(split_fractions(text) < task.val_fraction).astype(np.int8),
    )


def _no_tokenizer_threads() -> None:
    """Worker processes encode on one thread each; the pool provides the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


@dataclass
class _ShardFile:
    path: str
    rows: int
    tokens: int


_END = int(np.iinfo(np.int64).max)  # `next_doc` of a split whose every document is written


@dataclass
class _Written:
    """What is on disk for one split: the state that `progress/state.json` records."""

    next_doc: int = 0  # every document of this split before this corpus position is written
    shards: list[_ShardFile] = field(default_factory=list)


@dataclass
class _Split:
    """Documents of one split waiting for their shard, and the shards written or being written."""

    name: str
    next_doc: int = 0  # documents before this corpus position are written or being written
    shards: list[_ShardFile] = field(default_factory=list)
    ids: list[pa.Array] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    rows: list[pa.Table] = field(default_factory=list)  # pending stats rows (kept and dropped)
    tokens: int = 0
    written: _Written = field(default_factory=_Written)
    writing: cf.Future[None] | None = None  # the shard being written in the background, if any


class _ShardWriter:
    """Cuts each split into shards of about `shard_tokens` and records progress after each.

    A full shard is written on a thread of its split (one per split, so a split's
    shards land in order) while the caller goes on routing documents: building
    the IPC bytes, hashing them and writing them release the GIL, so writing
    overlaps encoding, and at the end of the corpus both splits' last shards are
    written at once. At most one shard per split is in the writing; the next
    waits for it. `progress/state.json` only ever names shards already on disk.
    """

    def __init__(self, stage_dir: Path, cfg: ShardsConfig, vocab_size: int, fingerprint: str) -> None:
        self.stage_dir, self.cfg, self.vocab_size, self.fingerprint = stage_dir, cfg, vocab_size, fingerprint
        self.progress_dir = stage_dir / PROGRESS_DIR
        self.splits = {name: _Split(name) for name in SPLITS}
        self.sha256: dict[str, tuple[int, str]] = {}  # (bytes, sha256) of each shard this run wrote
        self._records: dict[str, pa.Table] = {}  # the per-document record of each shard this run wrote
        self._state_lock = threading.Lock()
        self._threads = {name: cf.ThreadPoolExecutor(1, thread_name_prefix=f"shards-{name}") for name in SPLITS}

    # -- resuming -------------------------------------------------------------------------------

    def resume(self) -> int:
        """Adopt a previous run's completed shards if it had the same inputs; returns where to restart."""
        sweep_temporaries(self.stage_dir)
        state_path = self.progress_dir / STATE_FILE
        state: dict[str, Any] | None = None
        if state_path.is_file():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("fingerprint") != self.fingerprint:
                state = None
        keep: set[str] = set()
        if state is not None:
            for name in SPLITS:
                split = self.splits[name]
                split.next_doc = int(state["splits"][name]["next_doc"])
                split.shards = [_ShardFile(**s) for s in state["splits"][name]["shards"]]
                split.written = _Written(split.next_doc, list(split.shards))
                keep.update(s.path for s in split.shards)
                keep.update(self._record_name(s.path) for s in split.shards)
        for path in self._owned_files():
            if path.relative_to(self.stage_dir).as_posix() not in keep:
                path.unlink()
        return min(s.next_doc for s in self.splits.values())

    def _owned_files(self) -> list[Path]:
        files = [p for name in SPLITS for p in self.stage_dir.glob(f"{name}-*{SHARD_SUFFIX}")]
        files += [self.stage_dir / "stats.parquet", self.stage_dir / "dropped.parquet"]
        if self.progress_dir.is_dir():
            files += [p for p in self.progress_dir.iterdir() if p.name != STATE_FILE]
        return [p for p in files if p.is_file()]

    @staticmethod
    def _record_name(shard: str) -> str:
        return f"{PROGRESS_DIR}/{Path(shard).stem}.parquet"

    def _save_state(self) -> None:
        """Record what is on disk; called under the state lock by whichever split's thread just wrote."""
        splits = {
            s.name: {"next_doc": s.written.next_doc, "shards": [vars(f) for f in s.written.shards]}
            for s in self.splits.values()
        }
        atomic_write_json(self.progress_dir / STATE_FILE, {"fingerprint": self.fingerprint, "splits": splits})

    # -- writing --------------------------------------------------------------------------------

    def add(self, batch: EncodedBatch) -> None:
        """Route a batch's documents (in corpus order) to their splits; close shards as they fill."""
        positions = batch.first_doc + np.arange(len(batch.lengths))
        for code, split in enumerate(self.splits.values()):
            chosen = (batch.split == code) & (positions >= split.next_doc)
            docs = np.flatnonzero(chosen)
            if len(docs) == 0:
                continue
            stats = self._stats_rows(batch, docs, split.name, positions)
            kept = docs[batch.lengths[docs] > 0]
            if len(kept) < len(docs):
                split.rows.append(stats.filter(pa.array(batch.lengths[docs] == 0)))
            if len(kept) == 0:
                continue
            kept_rows = stats.filter(pa.array(batch.lengths[docs] > 0))
            lens = batch.lengths[kept]
            # The chosen documents' tokens, in order: a mask over the tokens, no index per token.
            values = batch.values if len(docs) == len(chosen) else batch.values[np.repeat(chosen, batch.lengths)]
            offsets = np.concatenate([[0], np.cumsum(lens)])
            done = 0
            while done < len(kept):  # fill the open shard; close it when it reaches shard_tokens
                room = self.cfg.shard_tokens - split.tokens
                take = min(int(np.searchsorted(offsets[done + 1 :] - offsets[done], room)) + 1, len(kept) - done)
                end = done + take
                split.ids.append(batch.ids.take(pa.array(kept[done:end])))
                split.lengths.append(lens[done:end])
                split.values.append(values[offsets[done] : offsets[end]])
                split.rows.append(kept_rows.slice(done, take))
                split.tokens += int(offsets[end] - offsets[done])
                done = end
                if split.tokens >= self.cfg.shard_tokens:
                    self._flush(split, last_doc=int(positions[kept[end - 1]]))

    @staticmethod
    def _stats_rows(batch: EncodedBatch, docs: np.ndarray, split: str, positions: np.ndarray) -> pa.Table:
        take = pa.array(docs)
        lengths = batch.lengths[docs]
        return pa.table(
            {
                "id": batch.ids.take(take),
                "split": pa.array([split] * len(docs), pa.string()),
                "format": batch.formats.take(take),
                "source": batch.sources.take(take),
                "n_tokens": pa.array(lengths, pa.int64()),
                "n_bytes": pa.array(batch.n_bytes[docs], pa.int64()),
                "reason": pa.array([None if n else "empty_text" for n in lengths], pa.string()),
                "_pos": pa.array(positions[docs], pa.int64()),
            }
        )

    def _flush(self, split: _Split, last_doc: int | None) -> None:
        """Hand the split's pending documents to its thread as its next shard.

        `last_doc` is the corpus position of the shard's last document (None at
        the end of the corpus): dropped documents up to it go with this shard.
        """
        rows = pa.concat_tables(split.rows) if split.rows else _PENDING_SCHEMA.empty_table()
        if split.rows:
            rows = rows.sort_by("_pos")
            if last_doc is not None:
                later = pc.greater(rows.column("_pos"), last_doc)
                split.rows = [rows.filter(later)]
                rows = rows.filter(pc.invert(later))
            else:
                split.rows = []
        rows = rows.drop_columns(["_pos"]) if "_pos" in rows.column_names else rows
        name = f"{split.name}-{len(split.shards):05d}{SHARD_SUFFIX}"
        shard = _ShardFile(path=name, rows=sum(len(i) for i in split.ids), tokens=split.tokens)
        split.shards.append(shard)
        self._records[shard.path] = rows
        next_doc = last_doc + 1 if last_doc is not None else _END
        parts = (split.ids, split.lengths, split.values)
        split.ids, split.lengths, split.values, split.tokens = [], [], [], 0
        split.next_doc = next_doc
        if split.writing is not None:
            split.writing.result()  # one shard per split in the writing bounds the memory held
        split.writing = self._threads[split.name].submit(self._write, split, shard, rows, parts, next_doc)

    def _write(
        self,
        split: _Split,
        shard: _ShardFile,
        rows: pa.Table,
        parts: tuple[list[pa.Array], list[np.ndarray], list[np.ndarray]],
        next_doc: int,
    ) -> None:
        """Write a shard and its per-document record, then record the progress (on the split's thread).

        The last shard of a split records no progress: the stage completes right
        after it, and a run killed before that redoes only the corpus after the
        last recorded shard (its unrecorded files are deleted on resuming).
        """
        ids, lengths, values = parts
        if ids:  # else only dropped documents are left: their record is kept, no shard is written
            offsets = np.zeros(shard.rows + 1, dtype=np.int64)
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
            flat = values[0] if len(values) == 1 else np.concatenate(values)
            data = token_shard_bytes(pa.concat_arrays(ids), flat, offsets, self.vocab_size, name=shard.path)
            del flat, parts, ids, values
            self.sha256[shard.path] = (data.size, write_shard_bytes(self.stage_dir / shard.path, data))
        if next_doc == _END:
            return
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        with ParquetWriter(self.stage_dir / self._record_name(shard.path), schema=_PENDING_SCHEMA) as writer:
            writer.write(rows)
        with self._state_lock:
            split.written.shards.append(shard)
            split.written.next_doc = next_doc
            self._save_state()

    def flush_all(self) -> None:
        """At the end of the corpus: hand every split's pending documents to its thread as its last shard."""
        for split in self.splits.values():
            if split.ids or split.rows:
                self._flush(split, last_doc=None)

    def finish(self) -> None:
        """Write what is pending and wait for every shard to be on disk."""
        self.flush_all()
        self.close()

    def close(self) -> None:
        """Wait for the shards in the writing (raising the first error) and end the split threads."""
        try:
            for split in self.splits.values():
                if split.writing is not None:
                    split.writing.result()
        finally:
            for thread in self._threads.values():
                thread.shutdown(wait=True)

    def describe(self, shard: _ShardFile) -> OutputFile:
        """The manifest entry of a shard: its checksum taken when it was written, else read from disk."""
        known = self.sha256.get(shard.path)
        if known is None:  # adopted from an interrupted run
            return describe_file(self.stage_dir, self.stage_dir / shard.path, rows=shard.rows)
        return OutputFile(path=shard.path, rows=shard.rows, bytes=known[0], sha256=known[1])

    def records(self) -> pa.Table:
        """The progress records of all shards, in split then shard order (read back for adopted shards)."""
        tables = [
            self._records[s.path]
            if s.path in self._records
            else pq.read_table(self.stage_dir / self._record_name(s.path), schema=_PENDING_SCHEMA)
            for split in self.splits.values()
            for s in split.shards
        ]
        return pa.concat_tables(tables) if tables else _PENDING_SCHEMA.empty_table()


def _tasks(
    input_files: list[Path],
    metadata: list[pq.FileMetaData],
    tokenizer_file: Path,
    cfg: ShardsConfig,
    resume_at: int,
    encoder: str,
    digest: str,
) -> list[EncodeTask]:
    """One task per Parquet row group, skipping row groups that a previous run fully wrote."""
    tasks: list[EncodeTask] = []
    position = 0
    for path, meta in zip(input_files, metadata, strict=True):
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if position + rows > resume_at and rows:
                tasks.append(EncodeTask(
                    str(path), rg, position, str(tokenizer_file), cfg.eot, cfg.batch_docs, cfg.val_fraction, encoder,
                    digest,
                ))
            position += rows
    return tasks


def _fingerprint(
    input_files: list[Path], metadata: list[pq.FileMetaData], tokenizer_digest: str, cfg: ShardsConfig
) -> str:
    """What the shards depend on: inputs, tokenizer, and the config keys that change the output."""
    inputs = [(str(p), p.stat().st_size, m.num_rows) for p, m in zip(input_files, metadata, strict=True)]
    shaping = cfg.model_dump(include={"val_fraction", "shard_tokens", "eot"})
    return stable_hash({"inputs": inputs, "tokenizer": tokenizer_digest, "config": shaping})


def run_encode(
    input_files: list[Path],
    tokenizer_file: Path,
    stage_dir: Path,
    cfg: ShardsConfig,
    progress: bool = True,
    executor: cf.Executor | None = None,
) -> StageResult:
    """Encode the curated documents into train/val token shards; resumes a killed run."""
    input_files = [Path(p) for p in input_files]
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not Path(tokenizer_file).is_file():
        load_tokenizer(tokenizer_file, cfg.eot)  # raises the error that says which stage makes it
    digest = file_sha256(tokenizer_file)
    first_fast = FAST_ENCODERS[0] if cfg.encoder in ("auto", "fast") else cfg.encoder
    warming = _warm_up(first_fast, str(tokenizer_file), cfg.eot, digest) if cfg.encoder != "tokenizers" else None
    # Loaded once per process and tokenizer file (the workers' row groups use the same cache).
    eot_id, vocab_size = _vocab(str(tokenizer_file), cfg.eot, digest)

    metadata = [pq.ParquetFile(p).metadata for p in input_files]  # each footer read once
    writer = _ShardWriter(stage_dir, cfg, vocab_size, _fingerprint(input_files, metadata, digest, cfg))
    resume_at = writer.resume()
    # The encoder never changes the output (the gate sees to it), so it is not in the fingerprint.
    gate_started = time.perf_counter()
    sample = _corpus_sample(input_files, metadata, cfg.gate_docs) if cfg.encoder != "tokenizers" else []
    gate = parity_gate(tokenizer_file, cfg.eot, sample, cfg.encoder, tokenizer_digest=digest)
    gate_seconds = time.perf_counter() - gate_started
    if warming is not None:
        warming.join()  # done by now, unless a remembered verdict made the gate instant
    tasks = _tasks(input_files, metadata, Path(tokenizer_file), cfg, resume_at, gate.encoder, digest)
    total_docs = sum(m.num_rows for m in metadata)

    # Without an executor: threads of this process (the tokenizer releases the GIL, so reading and
    # flattening one row group overlaps encoding the next), or `workers` processes of our own.
    if executor is not None:
        pool, own_pool, ahead = executor, None, cfg.in_flight * executor_workers(executor)
    elif cfg.workers > 1:
        context = multiprocessing.get_context("spawn")
        own_pool = cf.ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_no_tokenizer_threads)
        pool, ahead = own_pool, cfg.in_flight * cfg.workers
    else:
        # Two threads with `in_flight` row groups pending each: while this thread routes one row group,
        # two more are in work, so one's reading and split hashing (one core each, GIL released)
        # overlaps the other's encoding (on the encoder's own thread pool) and neither core waits.
        own_pool = cf.ThreadPoolExecutor(2, thread_name_prefix="encode")
        pool, ahead = own_pool, cfg.in_flight * 2

    started = time.perf_counter()
    bar = tqdm(total=total_docs, initial=min(resume_at, total_docs), desc="shards: encoding", unit="doc",
               disable=not progress)
    try:
        for batch in map_in_order(encode_row_group, ((task,) for task in tasks), pool, ahead):
            writer.add(batch)
            bar.update(len(batch.lengths))
        writer.flush_all()
        # Stats and the dropped list are written here while the split threads write the last shards.
        records = _write_tables(stage_dir, writer.records())
        writer.close()
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.shutdown(cancel_futures=True)
        writer.close()  # after an error too: no shard is left in the writing
    seconds = time.perf_counter() - started

    result = _result(stage_dir, writer, records, vocab_size, eot_id, seconds)
    result.extra["encoder"] = gate.encoder
    result.extra["encoder_gate"] = gate.as_dict()
    result.metrics.update(gate_seconds=gate_seconds, fast_encoder=float(gate.encoder != "tokenizers"))
    return result


@dataclass
class _Records:
    """Every document's record, split into the encoded (`stats.parquet`) and the dropped ones."""

    all: pa.Table
    kept: pa.Table
    dropped: pa.Table


def _write_tables(stage_dir: Path, records: pa.Table) -> _Records:
    """Write `stats.parquet` and `dropped.parquet` from the per-shard records."""
    kept_mask = pc.is_null(records.column("reason"))
    kept = records.filter(kept_mask).drop_columns(["reason"])
    dropped = records.filter(pc.invert(kept_mask))
    stats_path = stage_dir / "stats.parquet"
    with ParquetWriter(stats_path, schema=STATS_SCHEMA) as w:
        w.write(kept)
    dropped_path = stage_dir / "dropped.parquet"
    with ParquetWriter(dropped_path, schema=DROPPED_SCHEMA) as w:
        w.write(
            dropped_rows(
                dropped.column("id").to_pylist(),
                dropped.column("source").to_pylist(),
                STAGE,
                dropped.column("reason").to_pylist(),
                [f"{n} bytes of text" for n in dropped.column("n_bytes").to_pylist()],
            )
        )
    return _Records(records, kept, dropped)


def _result(
    stage_dir: Path, writer: _ShardWriter, records: _Records, vocab_size: int, eot_id: int, seconds: float
) -> StageResult:
    """Assemble the manifest entries, counts and metrics once every file is on disk."""
    kept, dropped = records.kept, records.dropped
    stats_path, dropped_path = stage_dir / "stats.parquet", stage_dir / "dropped.parquet"
    outputs = []
    extra: dict[str, Any] = {"vocab_size": vocab_size, "eot_id": eot_id, "dtype": str(token_dtype(vocab_size))}
    for split in writer.splits.values():
        files = [s for s in split.shards if s.rows]
        outputs += [writer.describe(s) for s in files]
        extra[f"{split.name}_files"] = [s.path for s in files]
        extra[f"{split.name}_tokens"] = sum(s.tokens for s in files)
        in_split = pc.equal(kept.column("split"), split.name)
        extra[f"{split.name}_bytes"] = int(pc.sum(kept.filter(in_split).column("n_bytes")).as_py() or 0)
        extra[f"{split.name}_documents"] = sum(s.rows for s in files)
    outputs.append(describe_file(stage_dir, stats_path, rows=kept.num_rows))
    outputs.append(describe_file(stage_dir, dropped_path, rows=dropped.num_rows))
    extra["shard_bytes"] = {o.path: o.bytes for o in outputs if o.path.endswith(SHARD_SUFFIX)}

    reasons = pc.value_counts(dropped.column("reason")).to_pylist() if dropped.num_rows else []
    counts = Counts(
        **{"in": records.all.num_rows},
        kept=kept.num_rows,
        dropped={r["values"]: r["counts"] for r in reasons},
    )
    counts.check(STAGE)
    tokens = extra["train_tokens"] + extra["val_tokens"]
    text_bytes = extra["train_bytes"] + extra["val_bytes"]
    metrics = {"seconds": seconds, "tokens": float(tokens), "bytes_per_token": text_bytes / max(1, tokens)}
    if seconds > 0:
        metrics.update(tokens_per_s=tokens / seconds, mb_per_s=text_bytes / 2**20 / seconds)
    shutil.rmtree(writer.progress_dir, ignore_errors=True)
    return StageResult(outputs=outputs, counts=counts, metrics=metrics, extra=extra)
