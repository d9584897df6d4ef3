"""The fast encoder and the fast BPE trainer: same ids, same shards, same merges as `tokenizers`."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter
from refinery.storage.manifest import file_sha256
from refinery.tasks import encode
from refinery.tasks.encode import (
    ENCODERS,
    FastokensEncoder,
    GigatokenEncoder,
    ShardsConfig,
    TokenizersEncoder,
    adversarial_texts,
    encode_texts,
    first_mismatch,
    gate_sample,
    parity_gate,
    run_encode,
)
from refinery.tasks.tokenizer import (
    EOT,
    TokenizerConfig,
    load_tokenizer,
    run_train_tokenizer,
    train_bpe_fast,
    train_bpe_reference,
)

PAD = "<|pad|>"
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zé", "ñu", "шо", "水", "🙂", "th", "qu", "x"]
EXTRAS = ["\n", "\t", "  ", "\r\n", "\x00", "1234", "3.14", "<p>", "if (x) {", "});", EOT, PAD, "\u202eعربي", "é"]


def word(rng: random.Random) -> str:
    # Zipf-like: short common words and a long tail, so BPE has real merges to learn
    n = min(1 + int(rng.expovariate(0.6)), 6)
    return "".join(SYLLABLES[min(int(rng.expovariate(0.35)), len(SYLLABLES) - 1)] for _ in range(n))


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [rng.choice(EXTRAS) if rng.random() < 0.08 else word(rng) for _ in range(rng.randint(0, 120))]
        texts.append(" ".join(parts))
    return texts


def write_corpus(directory: Path, texts: list[str]) -> list[Path]:
    rows = [{"id": f"d{i:05d}", "text": t, "source": f"raw/f{i % 3}.txt#{i}", "format": ["text", "code"][i % 2],
             "bytes": len(t.encode()), "meta": "{}"} for i, t in enumerate(texts)]
    writer = PartWriter(directory, schema=DOCUMENT_SCHEMA, rows_per_part=300, row_group_size=100)
    for start in range(0, len(rows), 100):
        writer.write(pa.Table.from_pylist(rows[start : start + 100], schema=DOCUMENT_SCHEMA))
    writer.close()
    return sorted(directory.glob("part-*.parquet"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("fast")
    files = write_corpus(root / "curated", make_texts(900))
    cfg = TokenizerConfig(vocab_size=700, special_tokens=[EOT, PAD])
    run_train_tokenizer(files, root / "tokenizer", cfg, progress=False)
    return root, files, root / "tokenizer" / "tokenizer.json"


@pytest.fixture(scope="module", params=["gigatoken", "fastokens"])
def encoders(corpus, request: pytest.FixtureRequest) -> tuple[GigatokenEncoder | FastokensEncoder, TokenizersEncoder]:
    """Each fast encoder, with the reference it must reproduce."""
    _, _, tokenizer = corpus
    return ENCODERS[request.param](tokenizer), TokenizersEncoder(tokenizer)


def ids_of(encoder, texts: list[str]) -> list[list[int]]:
    values, offsets = encoder.encode_flat(texts)
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))]


# -- parity of the encoders ----------------------------------------------------------------------

WHITESPACE = st.text(alphabet=" \t\n\r\x0b\x0c\x00\u3000\u00a0\u2028\u200b\ufeff", min_size=1, max_size=300)
PIECES = st.one_of(
    st.text(),  # every category hypothesis draws (no surrogates: a Python str from Parquet holds none)
    WHITESPACE,
    st.sampled_from([EOT, PAD, "<|endoftext", "|>", "<|", "endoftext"]),
    st.text(alphabet="0123456789", min_size=1, max_size=200),
    st.text(alphabet=st.characters(categories=["L", "M"]), min_size=50, max_size=1000),  # very long "words"
    st.text(alphabet=st.characters(categories=["Mn", "Me", "Cf", "Co", "Zs", "So", "Sk"]), max_size=50),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(), min_size=1, max_size=8))
def test_fast_encoder_agrees_on_any_unicode(encoders, texts: list[str]) -> None:
    fast, reference = encoders
    assert ids_of(fast, texts) == ids_of(reference, texts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.lists(PIECES, max_size=12).map("".join), min_size=1, max_size=6))
def test_fast_encoder_agrees_on_whitespace_runs_digits_and_special_token_text(encoders, texts: list[str]) -> None:
    fast, reference = encoders
    got = ids_of(fast, texts)
    assert got == ids_of(reference, texts)
    eot_id = reference.eot_id
    assert all(eot_id not in ids for ids in got)  # special-token text in a document stays plain text


def test_adversarial_strings_and_the_corpus_sample_agree(corpus, encoders) -> None:
    _, files, _ = corpus
    fast, reference = encoders
    sample = gate_sample(files, 50)
    assert len(sample) == 50 and sample == gate_sample(files, 50)  # deterministic
    texts = sample + adversarial_texts([EOT, PAD])
    assert first_mismatch(fast, reference, texts) is None
    assert any(len(t) >= 20000 for t in texts) and any(EOT in t and t != EOT for t in texts)


def test_gigatoken_reads_arrow_columns_as_it_reads_python_strings(corpus) -> None:
    """Straight from Arrow's buffers: sliced arrays (a non-zero offset), both string types, empty strings."""
    _, _, tokenizer = corpus
    giga, reference = GigatokenEncoder(tokenizer), TokenizersEncoder(tokenizer)
    texts = make_texts(300, seed=7) + ["", f"x {EOT} y", "\x00", "🙂" * 40, ""]
    for column in (pa.array(texts, pa.large_string()), pa.array(texts, pa.string())):
        for start, length in ((0, len(texts)), (37, 120), (len(texts) - 5, 5), (3, 0)):
            chunk = column.slice(start, length)
            got = encode_texts(giga, chunk)
            assert ids_of_flat(got, length) == ids_of(reference, texts[start : start + length])
            assert got[0].dtype == np.uint32 and got[1].dtype == np.int64


def ids_of_flat(flat: tuple[np.ndarray, np.ndarray], n: int) -> list[list[int]]:
    values, offsets = flat
    assert len(offsets) == n + 1
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(n)]


# -- the gate -------------------------------------------------------------------------------------


class DigitsDiffer(FastokensEncoder):
    """The real fast encoder, except that it drops the last id of any text with a digit in it."""

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        values, offsets = super().encode_flat(texts)
        keep = np.ones(len(values), dtype=bool)
        for i, text in enumerate(texts):
            if any(c.isdigit() for c in text) and offsets[i + 1] > offsets[i]:
                keep[offsets[i + 1] - 1] = False
        lengths = np.array([int(keep[offsets[i] : offsets[i + 1]].sum()) for i in range(len(texts))], np.int64)
        return values[keep], np.concatenate([[0], np.cumsum(lengths)])


def test_gate_passes_the_fast_encoder_when_it_agrees(corpus) -> None:
    _, files, tokenizer = corpus
    gate = parity_gate(tokenizer, EOT, gate_sample(files, 100))
    assert gate.encoder == "gigatoken" and gate.reason is None and gate.checked > 100


def test_gate_falls_back_with_a_warning_naming_the_first_mismatch(corpus) -> None:
    _, files, tokenizer = corpus
    sample = ["no digits here", "room 101 is open", "and 7 more"]
    with pytest.warns(RuntimeWarning, match="room 101 is open"):
        gate = parity_gate(tokenizer, EOT, sample, "auto", candidate=DigitsDiffer(tokenizer))
    assert gate.encoder == "tokenizers" and "room 101 is open" in (gate.reason or "")
    with pytest.raises(RuntimeError, match="shards.encoder=fast"):
        parity_gate(tokenizer, EOT, sample, "fast", candidate=DigitsDiffer(tokenizer))


class GigatokenDigitsDiffer(GigatokenEncoder):
    """The real gigatoken encoder, except that it drops the first id of any text with a digit in it."""

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        values, offsets = super().encode_flat(texts)
        keep = np.ones(len(values), dtype=bool)
        for i, text in enumerate(texts):
            if any(c.isdigit() for c in text) and offsets[i + 1] > offsets[i]:
                keep[offsets[i]] = False
        lengths = np.array([int(keep[offsets[i] : offsets[i + 1]].sum()) for i in range(len(texts))], np.int64)
        return values[keep], np.concatenate([[0], np.cumsum(lengths)])

    def encode_arrow(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_flat(texts.to_pylist())


def test_a_fast_encoder_that_differs_hands_over_to_the_next(corpus, tmp_path: Path, monkeypatch) -> None:
    """gigatoken differing on digits: the gate picks fastokens, with no warning, and the bytes are the same."""
    _, files, tokenizer = corpus
    monkeypatch.setitem(encode.ENCODERS, "gigatoken", GigatokenDigitsDiffer)
    monkeypatch.setattr(encode, "_ENCODERS", {})  # nor may its encoder or verdict outlive this test
    monkeypatch.setattr(encode, "_GATE_VERDICTS", {})
    sample = ["no digits here", "room 101 is open"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gate = parity_gate(tokenizer, EOT, sample, "fast")
        cfg = ShardsConfig(shard_tokens=5000, val_fraction=0.1, batch_docs=64, encoder="fast")
        result = run_encode(files, tokenizer, tmp_path / "fastokens", cfg, progress=False)
    assert gate.encoder == "fastokens" and result.extra["encoder"] == "fastokens"
    reference = cfg.model_copy(update={"encoder": "tokenizers"})
    run_encode(files, tokenizer, tmp_path / "ref", reference, progress=False)
    assert digests(tmp_path / "fastokens") == digests(tmp_path / "ref")
    monkeypatch.setattr(encode, "FAST_ENCODERS", ("gigatoken",))  # no other to hand over to: the reference
    with pytest.warns(RuntimeWarning, match="gigatoken ids differ from tokenizers on 'room 101 is open'"):
        assert parity_gate(tokenizer, EOT, sample).encoder == "tokenizers"


def test_a_tokenizer_the_fast_library_cannot_load_falls_back(corpus, tmp_path: Path) -> None:
    """An NFKC normalizer: `tokenizers` applies it, `fastokens` refuses the file, the stage still runs."""
    root, files, tokenizer = corpus
    data = json.loads(tokenizer.read_text())
    data["normalizer"] = {"type": "NFKC"}
    nfkc = tmp_path / "tokenizer.json"
    nfkc.write_text(json.dumps(data))
    cfg = ShardsConfig(shard_tokens=4000)
    with pytest.warns(RuntimeWarning, match="fastokens unavailable"):
        result = run_encode(files, nfkc, tmp_path / "auto", cfg, progress=False)
    assert result.extra["encoder"] == "tokenizers" and result.metrics["fast_encoder"] == 0.0
    assert "NFKC" in result.extra["encoder_gate"]["fallback_reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_encode(files, nfkc, tmp_path / "reference", cfg.model_copy(update={"encoder": "tokenizers"}),
                   progress=False)
    assert digests(tmp_path / "auto") == digests(tmp_path / "reference")


def test_gate_verdict_is_remembered_for_the_same_tokenizer_contents_and_sample(
    corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, files, tokenizer = corpus
    path = tmp_path / "tokenizer.json"
    path.write_bytes(tokenizer.read_bytes())
    compared = []
    real_gate = encode._run_gate
    monkeypatch.setattr(encode, "_run_gate", lambda *args: compared.append(args) or real_gate(*args))
    sample = gate_sample(files, 30)
    first = parity_gate(path, EOT, sample, tokenizer_digest=file_sha256(path))
    again = parity_gate(path, EOT, sample, "fast", tokenizer_digest=file_sha256(path))
    assert first.encoder == again.encoder == "gigatoken" and again.checked == first.checked and len(compared) == 1
    parity_gate(path, EOT, sample[:10], tokenizer_digest=file_sha256(path))  # another sample is compared again
    parity_gate(path, EOT, sample)  # and so is a tokenizer named without its digest
    assert len(compared) == 3

    # Same path, new contents that the fast library cannot load: the remembered verdict must not apply.
    data = json.loads(path.read_text())
    data["normalizer"] = {"type": "NFKC"}
    path.write_text(json.dumps(data))
    for _ in range(2):  # compared once, remembered, and the fallback is still said every time
        with pytest.warns(RuntimeWarning, match="fastokens unavailable"):
            gate = parity_gate(path, EOT, sample, tokenizer_digest=file_sha256(path))
        assert gate.encoder == "tokenizers" and "NFKC" in (gate.reason or "")
    assert len(compared) == 4
    with pytest.raises(RuntimeError, match="shards.encoder=fast"):
        parity_gate(path, EOT, sample, "fast", tokenizer_digest=file_sha256(path))

    # The whole stage over the replaced file: the reference encodes it, with the new normalizer.
    with pytest.warns(RuntimeWarning, match="fastokens unavailable"):
        result = run_encode(files, path, tmp_path / "nfkc", ShardsConfig(shard_tokens=4000), progress=False)
    assert result.extra["encoder"] == "tokenizers"
    cfg = ShardsConfig(shard_tokens=4000, encoder="tokenizers")
    assert run_encode(files, path, tmp_path / "reference", cfg, progress=False).extra["encoder"] == "tokenizers"
    assert digests(tmp_path / "nfkc") == digests(tmp_path / "reference")


def test_corpus_sample_is_read_again_when_a_file_changes(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "curated", make_texts(400, seed=3))
    metadata = [pq.ParquetFile(p).metadata for p in files]
    first = encode._corpus_sample(files, metadata, 40)
    assert first == gate_sample(files, 40) and encode._corpus_sample(files, metadata, 40) is first
    assert encode._corpus_sample(files, metadata, 20) == gate_sample(files, 20)  # another size: drawn again
    files = write_corpus(tmp_path / "curated", make_texts(400, seed=4))  # same paths, new documents
    metadata = [pq.ParquetFile(p).metadata for p in files]
    again = encode._corpus_sample(files, metadata, 40)
    assert again == gate_sample(files, 40) and again != first


# -- shards are byte-identical ------------------------------------------------------------------------


def digests(stage: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}


def test_shards_are_byte_identical_between_encoders(corpus, tmp_path: Path) -> None:
    """In process here; tests/test_encode.py checks that worker processes write the same bytes."""
    _, files, tokenizer = corpus
    cfg = ShardsConfig(shard_tokens=5000, val_fraction=0.1, batch_docs=64)
    results = {}
    for encoder in ("fast", "gigatoken", "fastokens", "tokenizers"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the gate must pass without a warning
            results[encoder] = run_encode(files, tokenizer, tmp_path / encoder,
                                          cfg.model_copy(update={"encoder": encoder}), progress=False)
    assert results["fast"].extra["encoder"] == "gigatoken" and results["fast"].metrics["fast_encoder"] == 1.0
    assert [results[e].extra["encoder"] for e in ("gigatoken", "fastokens", "tokenizers")] == [
        "gigatoken", "fastokens", "tokenizers"
    ]
    assert len(results["fast"].extra["train_files"]) > 2
    for encoder in ("gigatoken", "fastokens", "tokenizers"):
        assert digests(tmp_path / encoder) == digests(tmp_path / "fast")
        assert [o.model_dump() for o in results[encoder].outputs] == [o.model_dump() for o in results["fast"].outputs]


# -- the trainer ---------------------------------------------------------------------------------


def model_of(tok: Tokenizer) -> tuple[dict[str, int], list[list[str]]]:
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [list(m) for m in model["merges"]]


@pytest.mark.parametrize(("vocab_size", "min_frequency"), [(900, 2), (1500, 1)])
def test_fast_trainer_learns_the_merges_of_bpe_trainer(vocab_size: int, min_frequency: int) -> None:
    texts = make_texts(1500, seed=1)
    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT, PAD])
    reference = train_bpe_reference([texts], cfg)
    fast = train_bpe_fast(texts, vocab_size, min_frequency, [EOT, PAD])
    assert fast is not None, "the fast trainer should be usable on this sample"
    ref_vocab, ref_merges = model_of(reference)
    fast_vocab, fast_merges = model_of(fast)
    assert len(ref_merges) > 400
    assert fast_merges == ref_merges
    assert fast_vocab == ref_vocab
    assert fast.to_str() == reference.to_str()


def test_fast_trainer_steps_aside_where_bpe_trainer_stops_early() -> None:
    texts = make_texts(30, seed=2)  # too little text to fill 4000 tokens with pairs seen twice
    assert train_bpe_fast(texts, 4000, 2, [EOT]) is None


def test_stage_output_is_the_same_file_with_either_trainer(corpus, tmp_path: Path) -> None:
    _, files, _ = corpus
    cfg = TokenizerConfig(vocab_size=700, special_tokens=[EOT, PAD])
    fast = run_train_tokenizer(files, tmp_path / "fast", cfg.model_copy(update={"trainer": "fast"}), progress=False)
    ref = run_train_tokenizer(files, tmp_path / "ref", cfg.model_copy(update={"trainer": "tokenizers"}),
                              progress=False)
    assert fast.extra["trainer"] == "gigatoken" and ref.extra["trainer"] == "tokenizers"
    assert (tmp_path / "fast" / "tokenizer.json").read_bytes() == (tmp_path / "ref" / "tokenizer.json").read_bytes()
    tok, eot_id = load_tokenizer(tmp_path / "fast" / "tokenizer.json")
    assert tok.token_to_id(PAD) == 1 and eot_id == 0
    text = f"ka lo 🙂 quoting {EOT} and\x00 ñu"
    ids = tok.encode(text).ids
    assert eot_id not in ids and tok.decode(ids, skip_special_tokens=False) == text
