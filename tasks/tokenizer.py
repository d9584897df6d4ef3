"""The tokenizer stage: train a byte-level BPE on a sample of the curated corpus.

Byte-level BPE maps every UTF-8 byte to a symbol before merging, so any text
(emoji, CJK, control characters, invalid-looking surrogates aside) encodes and
decodes back exactly: there is no unknown token and no normalisation. The
training sample is drawn uniformly over the corpus by a hash of the document
text, from the train split only, so the compression measured on the validation
split is measured on text the tokenizer never saw.

The merges are learned by `gigatoken.train_bpe` with Hugging Face tie-breaking,
several times faster than `tokenizers`' `BpeTrainer` and with the same merges in
the same order. One difference is checked on every run: `BpeTrainer` stops once
the best pair occurs fewer than `min_frequency` times (or not at all), while
`train_bpe` goes on to the full vocabulary. Pair counts never grow from one merge
to the next, so the fast result is used only when its last merge still met the
threshold (recounted on the sample); otherwise, as for small samples, the stage
trains with `BpeTrainer`.

Writes `tokenizer.json` (loadable by `transformers.PreTrainedTokenizerFast` and
`tokenizers.Tokenizer.from_file`) and `tokenizer_config.json` (so that
`AutoTokenizer.from_pretrained(stage_dir)` works too).
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from refinery.storage.atomic import atomic_path, atomic_write_json
from refinery.storage.documents import iter_batches
from refinery.storage.manifest import Counts, StageResult, describe_file
from refinery.storage.shards import is_val, split_fraction

STAGE = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"


class TokenizerConfig(BaseModel):
    """How the BPE is trained (or which existing tokenizer is brought instead)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, ge=300, le=1 << 20, description="target vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    sample_bytes: int = Field(64 * 2**20, gt=0, description="UTF-8 bytes of training text to sample")
    special_tokens: list[str] = Field(
        default_factory=lambda: [EOT], min_length=1, description="the first one closes every document"
    )
    existing: str | None = Field(None, description="path to a tokenizer.json to use instead of training")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="held-out split; keep equal to shards.val_fraction")
    eval_bytes: int = Field(16 * 2**20, gt=0, description="at most this much validation text is encoded for metrics")
    batch_docs: int = Field(1000, ge=1, description="documents read per batch")
    trainer: Literal["auto", "fast", "tokenizers"] = Field(
        "auto",
        description="auto: gigatoken unless the min_frequency check shows BpeTrainer would stop earlier, "
        "then BpeTrainer; fast: fail in that case; tokenizers: BpeTrainer only",
    )

    @field_validator("special_tokens")
    @classmethod
    def _distinct(cls, tokens: list[str]) -> list[str]:
        if len(set(tokens)) != len(tokens) or any(not t for t in tokens):
            raise ValueError("special_tokens must be distinct, non-empty strings")
        return tokens


def new_byte_level_bpe(model: models.BPE | None = None) -> Tokenizer:
    """A byte-level BPE (untrained unless `model` is given) set up to round-trip any Unicode string exactly."""
    tok = Tokenizer(model if model is not None else models.BPE())
    # No normaliser: the text is kept byte for byte. No prefix space: decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_chars() -> dict[int, str]:
    """The byte-level alphabet: the printable character `ByteLevel` uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_CHARS = _byte_chars()


def _as_chars(token: bytes) -> str:
    """Bytes as `ByteLevel` characters (latin-1 makes each byte the code point `str.translate` maps)."""
    return token.decode("latin-1").translate(BYTE_CHARS)


def bpe_from_merges(merges: list[tuple[bytes, bytes]], special_tokens: list[str]) -> Tokenizer:
    """The tokenizer `BpeTrainer` would have built from these merges (same ids, same JSON).

    `BpeTrainer` numbers the special tokens first, then the byte alphabet in code
    point order, then each merge's new token in merge order.
    """
    vocab: dict[str, int] = {}
    for token in special_tokens:
        vocab.setdefault(token, len(vocab))
    for char in sorted(BYTE_CHARS.values()):
        vocab.setdefault(char, len(vocab))
    pairs = [(_as_chars(a), _as_chars(b)) for a, b in merges]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    tok = new_byte_level_bpe(models.BPE(vocab=vocab, merges=pairs))
    tok.add_special_tokens(list(special_tokens))
    return tok


def _separator(texts: list[str]) -> str | None:
    """One code point found in no text: it splits the joined sample back into documents exactly.

    A single code point cannot match across a document boundary in valid UTF-8,
    so no document's text is ever cut or merged with its neighbour.
    """
    for cp in [*range(0xFDD0, 0xFDF0), 0xFFFE, 0xFFFF, 0x10FFFE, 0x10FFFF]:
        sep = chr(cp)
        if not any(sep in t for t in texts):
            return sep
    return None


def _last_merge_count(data: bytes, sep: bytes, merges: list[tuple[bytes, bytes]]) -> int:
    """How often the last merge's pair occurs in the sample once all earlier merges are applied.

    Counted as `BpeTrainer` counts: every adjacent occurrence in every pre-tokenized
    word, times the word's frequency. Only words containing the merged bytes can hold the pair.
    """
    from gigatoken.gigatoken_rs import pretokenized_counts

    left, right = merges[-1]
    merged = left + right
    words = [(w, c) for w, c in pretokenized_counts(data, sep) if merged in w]
    if not words:
        return 0
    earlier = bpe_from_merges(merges[:-1], [])
    earlier.pre_tokenizer = None  # the words are pre-tokenized already
    left_id, right_id = earlier.token_to_id(_as_chars(left)), earlier.token_to_id(_as_chars(right))
    total = 0
    for (_, count), enc in zip(words, earlier.encode_batch_fast([_as_chars(w) for w, _ in words]), strict=True):
        ids = enc.ids
        total += count * sum(1 for a, b in zip(ids, ids[1:], strict=False) if a == left_id and b == right_id)
    return total


def train_bpe_fast(
    texts: list[str], vocab_size: int, min_frequency: int, special_tokens: list[str]
) -> Tokenizer | None:
    """Train with `gigatoken.train_bpe`; None where `BpeTrainer` would stop earlier (a small sample).

    Raises `ValueError` when the sample cannot be handed over intact.
    """
    import gigatoken

    sep = _separator(texts)
    if sep is None:
        raise ValueError("no separator code point is absent from the sample")
    data = sep.join(texts).encode("utf-8")
    n_merges = vocab_size - len(set(special_tokens) | set(BYTE_CHARS.values()))
    if n_merges <= 0:
        return bpe_from_merges([], special_tokens)
    # No special tokens for gigatoken: BpeTrainer does not split text at them, and the ids are ours to assign.
    _, merges = gigatoken.train_bpe(data, 256 + n_merges, [], tie_breaking="huggingface", separator=sep.encode())
    if merges:
        last = _last_merge_count(data, sep.encode(), merges)
        if last < max(1, min_frequency):
            return None
    tok = bpe_from_merges(merges, special_tokens)
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError("the fast trainer's vocabulary is larger than vocab_size")
    return tok


def train_bpe_reference(texts: Iterable[list[str]], cfg: TokenizerConfig) -> Tokenizer:
    """Train with `tokenizers`' `BpeTrainer`, the reference the fast trainer must equal."""
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_bpe(texts: Iterable[list[str]], cfg: TokenizerConfig) -> tuple[Tokenizer, str]:
    """Train on batches of texts with the trainer `cfg.trainer` asks for; returns it and the trainer's name."""
    if cfg.trainer == "tokenizers":
        return train_bpe_reference(texts, cfg), "tokenizers"
    sample = [t for batch in texts for t in batch]
    try:
        tok = train_bpe_fast(sample, cfg.vocab_size, cfg.min_frequency, list(cfg.special_tokens))
        reason = f"the sample runs out of pairs occurring min_frequency={cfg.min_frequency} times"
    except (ImportError, ValueError) as err:
        tok, reason = None, f"{type(err).__name__}: {err}"
        warnings.warn(f"tokenizer: training with BpeTrainer instead of gigatoken: {reason}", RuntimeWarning,
                      stacklevel=2)
    if tok is not None:
        return tok, "gigatoken"
    if cfg.trainer == "fast":
        raise RuntimeError(f"tokenizer.trainer=fast but BpeTrainer would learn other merges: {reason}")
    return train_bpe_reference([sample], cfg), "tokenizers"


def load_tokenizer(path: str | Path, eot: str = EOT) -> tuple[Tokenizer, int]:
    """The tokenizer and its end-of-text id, set to encode special-token text in documents as plain text.

    A document that happens to contain the string `<|endoftext|>` must not
    smuggle an end-of-text id into the shards, so special tokens are only ever
    added by the pipeline itself.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; run the tokenizer stage first or set tokenizer.existing")
    tok = Tokenizer.from_file(str(path))
    eot_id = tok.token_to_id(eot)
    if eot_id is None:
        raise ValueError(f"{path} has no {eot!r} token; add it as a special token or pick a tokenizer that has it")
    tok.encode_special_tokens = True
    return tok, eot_id


def _estimated_text_bytes(paths: list[Path]) -> int:
    """Size of the `text` column from Parquet metadata: a cheap estimate to set the sampling rate."""
    total = 0
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        col = meta.schema.to_arrow_schema().get_field_index("text")
        total += sum(meta.row_group(i).column(col).total_uncompressed_size for i in range(meta.num_row_groups))
    return total


class _Scan:
    """One pass over the corpus: yields training text, keeps a validation sample, counts everything."""

    def __init__(self, paths: list[Path], cfg: TokenizerConfig, train: bool, progress: bool) -> None:
        self.paths, self.cfg, self.train, self.progress = paths, cfg, train, progress
        estimate = max(1, int(_estimated_text_bytes(paths) * (1 - cfg.val_fraction)))
        self.rate = min(1.0, cfg.sample_bytes / estimate) if train else 0.0
        self.counts: dict[str, int] = defaultdict(int)
        self.sample_bytes = 0
        self.val: list[tuple[str, str]] = []  # (format, text)
        self.val_bytes = 0

    def __iter__(self) -> Iterator[list[str]]:
        cfg = self.cfg
        bar = tqdm(desc="tokenizer: reading", unit="doc", disable=not self.progress)
        for batch in iter_batches(self.paths, columns=["text", "format"], batch_size=cfg.batch_docs):
            texts, formats = (batch.column(c).to_pylist() for c in ("text", "format"))
            chosen: list[str] = []
            for text, fmt in zip(texts, formats, strict=True):
                self.counts["in"] += 1
                if not text:
                    self.counts["empty_text"] += 1
                elif is_val(text, cfg.val_fraction):
                    self.counts["val_split"] += 1
                    if self.val_bytes < cfg.eval_bytes:
                        self.val.append((fmt, text))
                        self.val_bytes += len(text.encode("utf-8"))
                elif self.sample_bytes < cfg.sample_bytes and split_fraction(text, "bpe-sample") < self.rate:
                    self.counts["kept"] += 1
                    self.sample_bytes += len(text.encode("utf-8"))
                    chosen.append(text)
                else:
                    self.counts["not_sampled"] += 1
            bar.update(len(texts))
            if chosen:
                yield chosen
        bar.close()

    def run(self) -> None:
        """Read everything without training (an existing tokenizer is being brought)."""
        for _ in self:
            pass


def _bytes_per_token(tok: Tokenizer, val: list[tuple[str, str]]) -> dict[str, float]:
    """UTF-8 bytes per token on the validation sample, overall and per document format."""
    n_bytes: dict[str, int] = defaultdict(int)
    n_tokens: dict[str, int] = defaultdict(int)
    encodings = tok.encode_batch_fast([text for _, text in val])
    for (fmt, text), enc in zip(val, encodings, strict=True):
        n_bytes[fmt] += len(text.encode("utf-8"))
        n_tokens[fmt] += len(enc.ids)
    metrics = {f"bytes_per_token.{fmt}": n_bytes[fmt] / max(1, n_tokens[fmt]) for fmt in sorted(n_bytes)}
    metrics["bytes_per_token"] = sum(n_bytes.values()) / max(1, sum(n_tokens.values()))
    metrics["val_bytes"] = float(sum(n_bytes.values()))
    metrics["val_tokens"] = float(sum(n_tokens.values()))
    return metrics


def run_train_tokenizer(
    input_files: list[Path], stage_dir: Path, cfg: TokenizerConfig, progress: bool = True
) -> StageResult:
    """Train (or bring) the tokenizer and measure its compression on the validation split.

    Counts: `in` is every document read, `kept` the documents in the training
    sample; the rest are counted by why they were not used (`val_split`,
    `not_sampled`, `empty_text`). No document leaves the corpus here.
    """
    input_files = [Path(p) for p in input_files]
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    target = stage_dir / TOKENIZER_FILE
    eot = cfg.special_tokens[0]

    scan = _Scan(input_files, cfg, train=cfg.existing is None, progress=progress)
    started = time.perf_counter()
    trainer_name = "existing"
    if cfg.existing is not None:
        scan.run()
        load_tokenizer(cfg.existing, eot)  # fail early, with a message, on an unusable file
        with atomic_path(target) as tmp:
            shutil.copyfile(cfg.existing, tmp)
    else:
        tok, trainer_name = train_bpe(scan, cfg)
        if scan.counts["kept"] == 0:
            raise ValueError(
                "no training text: every document is empty or in the validation split; "
                "add documents or lower tokenizer.val_fraction"
            )
        with atomic_path(target) as tmp:
            tok.save(str(tmp))
    train_seconds = time.perf_counter() - started

    tok, eot_id = load_tokenizer(target, eot)
    config_file = stage_dir / "tokenizer_config.json"
    atomic_write_json(
        config_file,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eot,
            "bos_token": eot,
            "unk_token": eot,
            "additional_special_tokens": list(cfg.special_tokens[1:]),
            "clean_up_tokenization_spaces": False,
        },
    )

    metrics = _bytes_per_token(tok, scan.val) if scan.val else {}
    metrics.update(train_seconds=train_seconds, sample_bytes=float(scan.sample_bytes))
    metrics["fast_trainer"] = float(trainer_name == "gigatoken")
    if train_seconds > 0 and scan.sample_bytes:
        metrics["train_mb_per_s"] = scan.sample_bytes / 2**20 / train_seconds

    c = scan.counts
    counts = Counts(
        **{"in": c["in"]},
        kept=c["kept"],
        dropped={k: c[k] for k in ("val_split", "not_sampled", "empty_text") if c[k]},
    )
    counts.check(STAGE)
    return StageResult(
        outputs=[describe_file(stage_dir, target), describe_file(stage_dir, config_file)],
        counts=counts,
        metrics=metrics,
        extra={
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "eot_id": eot_id,
            "tokenizer_file": TOKENIZER_FILE,
            "special_tokens": list(cfg.special_tokens),
            "trained": cfg.existing is None,
            "trainer": trainer_name,
        },
    )

