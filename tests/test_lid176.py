"""lid.176 over Arrow buffers (`tasks/quality/lid176.py`) gives the `fasttext` binding's labels and probabilities."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from refinery.tasks.quality.language import (
    LABEL_PREFIX,
    fasttext_binding_languages,
    fasttext_languages,
    fasttext_model,
    lid176_path,
)
from refinery.tasks.quality.lid176 import CACHE_IDS, CACHE_SLOTS, Lid176, classify, fnv1a, lid176_model

DATA = Path(__file__).parent / "data" / "langid"
TOKENS = ["</s>", "__label__en", "__label__", "__label__zz", "<", ">", "<s>", "hello", "the", "Bonjour", "der",
          "привет", "日本語", "😀", "e\u0301", "\u200b", " ", "\t", "\v", "\f", "\r", "\n", "\x00", "\x1c", "\xa0",
          "\u3000", "\u2028"]


def binding(text: str) -> tuple[str | None, float]:
    """What fastText's predict says of one line: its label and probability, (None, 0.0) when it names none."""
    found = fasttext_model().f.predict(text.replace("\n", " ") + "\n", 1, 0.0, "strict")
    return (found[0][1].removeprefix(LABEL_PREFIX), found[0][0]) if found else (None, 0.0)


def kernel(texts: list[str], threads: int = 1) -> list[tuple[str | None, float]]:
    model = lid176_model(lid176_path())
    leaf, prob, _ = classify(model, pa.array(texts, pa.large_string()), threads=threads)
    return [(model.labels[i] if i >= 0 else None, float(p)) for i, p in zip(leaf.tolist(), prob.tolist(), strict=True)]


def test_the_model_is_read_whole() -> None:
    model = lid176_model(lid176_path())
    assert len(model.labels) == 176 and {"en", "de", "fr", "ru", "ja", "zh"} <= set(model.labels)
    assert model.rows.shape == (50_000, 16) and model.rows.dtype == np.float32
    assert (model.bucket_rows >= 0).sum() == 50_000 - model.nwords  # every kept bucket has its row
    assert model.eos == 0 and (model.minn, model.maxn) == (2, 4)


def test_fnv_reads_bytes_as_signed_chars() -> None:
    assert fnv1a(b"") == 2166136261
    assert fnv1a(b"a") == 0xE40C292C  # the FNV-1a test vector: ASCII is unaffected
    assert fnv1a("é".encode()) != fnv1a(bytes([0xC3 & 0x7F, 0xA9 & 0x7F]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(min_size=1, max_size=12)), max_size=14))
def test_arbitrary_unicode_gets_fasttexts_label_and_probability(parts: list[str]) -> None:
    text = "".join(parts)
    assert kernel([text]) == [binding(text)]


def test_adversarial_and_multilingual_texts_match_in_one_batch_and_across_threads() -> None:
    rng = random.Random(7)
    texts = [json.loads(line)["text"] for line in (DATA / "sentences.jsonl").read_text().splitlines()]
    for _ in range(1500):
        texts.append("".join(rng.choice(TOKENS) if rng.random() < 0.6 else
                             "".join(chr(rng.randint(32, 0x30FF)) for _ in range(rng.randint(1, 9)))
                             for _ in range(rng.randint(0, 15))))
    texts += ["", " ", "\n\n", "x" * 20_000, "word " * 3_000, "</s> hidden after the end of the line",
              "__label__en __label__de", "\x00\x00text\x00"]
    expected = [binding(t) for t in texts]
    assert kernel(texts, threads=1) == expected
    assert kernel(texts, threads=3) == expected
    sliced = pa.array(texts, pa.large_string()).slice(5, 100)  # an array that does not start at offset 0
    model = lid176_model(lid176_path())
    leaf, prob, _ = classify(model, sliced)
    assert [(model.labels[i] if i >= 0 else None, float(p)) for i, p in zip(leaf, prob, strict=True)] == expected[5:105]


def test_the_language_signal_equals_the_binding_call_per_text() -> None:
    texts = [json.loads(line)["text"] for line in (DATA / "sentences.jsonl").read_text().splitlines()]
    texts += [None, "", "\xa0\u3000", " \t ", "Ceci est une phrase.\nAnd this is English text, mostly."]
    arr = pa.array(texts, pa.large_string())
    langs, scores = fasttext_languages(arr, 2000)
    ref_langs, ref_scores = fasttext_binding_languages(arr, 2000)
    assert langs.to_pylist() == ref_langs.to_pylist()
    assert scores.tolist() == ref_scores.tolist()
    assert langs[len(texts) - 5].as_py() == "und" and scores[len(texts) - 3] == 0.0


# Words the kernel's per-call word cache must tell apart or treat specially: FNV-1a collisions of equal
# length (same cache key), labels of the model and label-like tokens (skipped), "</s>" (ends the line), words
# that are in the dictionary, that are not, non-ASCII words, and a long word.
CACHE_WORDS = ["declinate", "macallums", "altarage", "zinke", "costarring", "liquid", "</s>", "__label__en",
               "__label__", "__label__zz", "der", "the", "und", "Bonjour", "привет", "日本語", "😀", "e\u0301",
               "<", ">", "a", "x" * 300]
# (cache_slots, cache_ids): no cache at all, one entry, a crowded table with a buffer that fills, the defaults
CAPACITIES = [(2, 0), (2, 1_000), (4, 7), (8, 64), (CACHE_SLOTS, CACHE_IDS)]


def kernel_with(texts: list[str], threads: int, capacity: tuple[int, int]) -> list[tuple[str | None, float]]:
    model = lid176_model(lid176_path())
    slots, ids = capacity
    leaf, prob, _ = classify(model, pa.array(texts, pa.large_string()), threads=threads, cache_slots=slots,
                             cache_ids=ids)
    return [(model.labels[i] if i >= 0 else None, float(p)) for i, p in zip(leaf.tolist(), prob.tolist(),
                                                                               strict=True)]


def dictionary_word(model: Lid176, i: int) -> bytes:
    return bytes(model.word_bytes[model.word_offsets[i] : model.word_offsets[i + 1]])


def test_the_cache_words_collide_as_intended() -> None:
    assert fnv1a(b"declinate") == fnv1a(b"macallums") and fnv1a(b"costarring") == fnv1a(b"liquid")
    model = lid176_model(lid176_path())
    dictionary = {dictionary_word(model, i) for i in range(model.nwords)}
    assert {b"der", b"</s>"} <= dictionary and b"declinate" not in dictionary


def test_repeated_words_give_the_bindings_results_whatever_the_cache_size() -> None:
    rng = random.Random(11)
    model = lid176_model(lid176_path())
    vocab = CACHE_WORDS + [dictionary_word(model, i).decode() for i in range(1, 60)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))) for _ in range(700)]
    texts += ["declinate " * 50, "macallums declinate " * 20, "liquid costarring " * 30, "</s> " * 5 + "der",
              "der </s> der </s>", "__label__en der __label__zz der", "declinate", "macallums"]
    expected = [binding(t) for t in texts]
    for capacity in CAPACITIES:
        assert kernel_with(texts, 1, capacity) == expected, capacity
        assert kernel_with(texts, 2, capacity) == expected, capacity


def test_many_distinct_words_grow_and_fill_the_cache() -> None:
    rng = random.Random(5)
    alphabet = "abcdefghijklmnopqrstuvwxyzäöüßéè"
    vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(6_000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 60))) for _ in range(1_200)]
    expected = [binding(t) for t in texts]
    # the default table grows from 1,024 slots past 6,000 words; 2,048 slots or 3,000 ids fill up on the way
    for capacity in [(CACHE_SLOTS, CACHE_IDS), (2_048, CACHE_IDS), (CACHE_SLOTS, 3_000)]:
        assert kernel_with(texts, 1, capacity) == expected, capacity
    assert kernel_with(texts, 2, (CACHE_SLOTS, CACHE_IDS)) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.sampled_from(CACHE_WORDS + TOKENS), st.text(min_size=1, max_size=5)),
                         max_size=10).map(" ".join), min_size=1, max_size=12),
       st.sampled_from(CAPACITIES))
def test_a_batch_of_repeating_tokens_matches_the_binding_at_any_cache_size(
    texts: list[str], capacity: tuple[int, int]
) -> None:
    assert kernel_with(texts, 1, capacity) == [binding(t) for t in texts]
