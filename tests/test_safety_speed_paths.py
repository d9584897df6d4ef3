"""The compiled paths of the whitespace split and the safety family give the signals of their definitions.

`Words.split` is `str.split()` per text, numbered in order of first occurrence; the safety family's words are
`decontaminate.split_words`; block-list hits are whole-word, case-insensitive matches plus the phrases' regular
expression; the compiled search for phrases with punctuation is Arrow's case-insensitive regex; the classifier
is scikit-learn's. Texts mix ASCII, every Unicode whitespace character, non-ASCII words, empty and null texts.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from refinery.tasks.decontaminate import split_words
from refinery.tasks.quality._text import Words
from refinery.tasks.quality.base import Batch
from refinery.tasks.quality.safety import SafetyRules
from refinery.tasks.safety import StringSet, _split_words, safety_signals, toxicity_scores

# The 29 characters of `str.isspace` (and of Arrow's `utf8_split_whitespace`), and look-alikes that are not.
SPACES = ["\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f", " ", "\x85", "\xa0", "\u1680",
          *map(chr, range(0x2000, 0x200B)), "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]  # fmt: skip
NOT_SPACES = ["\u200b", "\ufeff", "\u180e", "\u2060", "\xad", "\u0085x"[1:]]
WORDS = ["the", "The", "THE", "blorgle", "BLORGLE", "Blorgle", "blorgles", "snarf", "café", "CAFÉ", "İstanbul",
         "naïve", "x", "a1_b", "can't", "e-mail", "s&m", "S&M", "g-spot", "G-Spot", "zorkmid", "scam", "ok.",
         "(blorgle)", "blorgle,", "字", "🖕", "K", "ſ", "’", "“blorgle”", "idiot—", "…", "°", "€", "Ⓐ", "ß",
         "e\u0301", "²", "ΣΑΣ", "_x_"]  # fmt: skip
LISTS = {"extra_words": ["blorgle", "snarf", "zorkmid scam", "big bad wolf", "a-b c", "naïve", "ſ-q"]}


def random_texts(rng: np.random.Generator, n: int) -> list[str | None]:
    pieces = WORDS + SPACES + NOT_SPACES + ["", " ", "  ", "\n\n", "-", "&", "a-b", "c", "big", "bad", "wolf"]
    out: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            out.append(None)
        elif r < 0.1:
            out.append("")
        else:
            out.append("".join(rng.choice(pieces, rng.integers(1, 30))))
    return out


def reference_words(texts: list[str | None]) -> tuple[list[str], list[int], list[int]]:
    """`str.split()` of each text: the distinct words in order of first occurrence, each word's number, counts."""
    per = [(t or "").split() for t in texts]
    numbers: dict[str, int] = {}
    ids = [numbers.setdefault(w, len(numbers)) for words in per for w in words]
    return list(numbers), ids, [len(words) for words in per]


def check_words(arr: pa.Array) -> None:
    texts = arr.to_pylist()
    vocab, ids, counts = reference_words(texts)
    words = Words.split(arr)
    assert words.vocab.type == pa.large_string() and words.vocab.to_pylist() == vocab
    assert words.ids.dtype == np.int64 and words.ids.tolist() == ids
    assert words.counts.tolist() == counts
    assert words.offsets.tolist() == [0, *np.cumsum(counts).tolist()]
    assert words.doc.tolist() == [i for i, c in enumerate(counts) for _ in range(c)]
    assert words.tokens.to_pylist() == [w for t in texts for w in (t or "").split()]
    assert words.ascii.tolist() == [(t or "").isascii() for t in texts]
    assert words.vocab_ascii.tolist() == [w.isascii() for w in vocab]


def test_plain_texts_are_split_over_bytes() -> None:
    """Punctuation, symbols and spaces without a case are separators to every split: such texts take the
    compiled path; a letter, mark or digit outside ASCII, or a cased symbol, sends a text to Arrow's split."""
    texts = ["you’re “here”—now…", "a\u3000b\xa0c", "5 °C, 3 €", "café", "e\u0301", "Ⓐ", "²", "plain"]
    split = _split_words(pa.array(texts, pa.large_string()))
    assert split.plain.tolist() == [True, True, True, False, False, False, False, True]
    assert split.ascii.tolist() == [False, False, False, False, False, False, False, True]
    expected, starts = split_words(texts)
    assert split.strings().to_pylist() == expected.to_pylist() and split.starts.tolist() == starts.tolist()


def test_whitespace_split_is_str_split_for_every_space_character() -> None:
    texts = [f"{s}a{s}b{s}" for s in SPACES] + [f"a{s}b" for s in NOT_SPACES] + ["", None, "a\x1f ", " \u3000 "]
    check_words(pa.array(texts, pa.large_string()))
    assert Words.split(pa.array([f"a{s}b" for s in SPACES])).counts.tolist() == [2] * len(SPACES)
    assert Words.split(pa.array([f"a{s}b" for s in NOT_SPACES])).counts.tolist() == [1] * len(NOT_SPACES)


@pytest.mark.parametrize("seed", range(4))
def test_whitespace_split_is_str_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(30):
        texts = random_texts(rng, int(rng.integers(1, 40)))
        check_words(pa.array(texts, pa.large_string()))
        check_words(pa.array(texts, pa.string()))
        check_words(pa.array(texts, pa.large_string()).slice(1))


def test_whitespace_split_of_empty_and_null_batches() -> None:
    for texts in ([], [None], ["", None, ""], ["   ", "\n"]):
        check_words(pa.array(texts, pa.large_string()))
    many = [f"w{i % 5000}" for i in range(20000)]  # the table of distinct words grows several times
    check_words(pa.array([" ".join(many[i : i + 100]) for i in range(0, len(many), 100)], pa.large_string()))


@pytest.mark.parametrize("seed", range(3))
def test_safety_words_are_the_regex_split(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        texts = random_texts(rng, int(rng.integers(1, 30)))
        arr = pa.array(texts, pa.large_string())
        expected, starts = split_words(texts)
        for split in (_split_words(texts), _split_words(arr, Words.split(arr))):
            assert split.strings().to_pylist() == expected.to_pylist()
            assert split.starts.tolist() == starts.tolist()
            assert split.ascii.tolist() == [(t or "").isascii() for t in texts]


def reference_hits(rules: SafetyRules, texts: list[str | None]) -> tuple[list[int], list[str]]:
    """Whole-word matches of the single words, looked up word by word, plus the phrases' expression in every text
    that holds a plain phrase's words in sequence or matches a phrase with punctuation (Arrow's regex)."""
    lists = rules.lists()
    hits, first = [], []
    for t in texts:
        words, _ = split_words([t])
        words = words.to_pylist()
        listed = [w for w in words if w in lists.words]
        n, shown = len(listed), listed[0] if listed else ""
        grams = {" ".join(words[i : i + k]) for k in lists.ngrams for i in range(len(words) - k + 1)}
        odd = bool(lists.phrase_filter) and pc.match_substring_regex(
            pa.array([t or ""]), lists.phrase_filter, ignore_case=True
        )[0].as_py()
        if odd or any(g in lists.ngrams[k] for k in lists.ngrams for g in grams):
            found = lists.phrases.findall(t or "")
            if found:
                n += len(found)
                shown = " ".join(found[0].lower().split())
        hits.append(n)
        first.append(shown)
    return hits, first


def test_listed_words_in_any_case_and_position() -> None:
    texts = [
        "blorgle at the start", "at the end BLORGLE", "in the Blorgle middle", "(blorgle), blorgle; blorgle.",
        "blorgles and snarfwobble are not listed", "café blorgle naïve NAÏVE", "blorgle\u3000snarf\xa0blorgle",
        "", None, "   ", "the zorkmid\n\t scam", "zorkmid, scam", "zorkmid", "scam zorkmid", "big bad\nwolf",
        "big bad", "a-b c", "A-B\tC", "a-b\x0bc", "a-bc", "s&m and G-SPOT", "S&M", "xs&my", "ſ-q", "s-q", "🖕",
        "blorgle " * 50, "caf\u00e9 zorkmid SCAM blorgle",
    ]  # fmt: skip
    rules = SafetyRules(**LISTS)
    sig = safety_signals(texts, None, rules)
    hits, first = reference_hits(rules, texts)
    assert sig["safety_word_hits"].to_pylist() == hits
    assert sig["safety_first_word"].to_pylist() == first
    assert hits[:10] == [1, 1, 1, 3, 0, 3, 3, 0, 0, 0]  # whole words, any case, by punctuation or any space
    assert hits[10:16] == [1, 0, 0, 0, 1, 0]  # a phrase across spaces, not across a comma, nor cut short
    assert first[10] == "zorkmid scam" and first[14] == "big bad wolf"
    assert hits[16:20] == [1, 1, 0, 0]  # RE2's \s has no vertical tab: the phrase filter does not pick that text
    assert hits[20:26] == [2, 1, 0, 1, 1, 1]  # "s-q" is a case-insensitive match of "ſ-q"
    assert hits[26:] == [50, 2] and first[27] == "zorkmid scam"


@pytest.mark.parametrize("seed", range(3))
def test_word_hits_on_random_batches(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    rules = SafetyRules(**LISTS)
    for _ in range(15):
        texts = random_texts(rng, int(rng.integers(1, 25)))
        arr = pa.array(texts, pa.large_string())
        for got in (safety_signals(texts, None, rules), safety_signals(arr, None, rules, arr, Words.split(arr))):
            hits, first = reference_hits(rules, texts)
            assert got["safety_word_hits"].to_pylist() == hits
            assert got["safety_first_word"].to_pylist() == first


def test_phrases_with_punctuation_are_found_as_arrow_finds_them() -> None:
    """The compiled search (ASCII texts) and Arrow's regex (others) together are Arrow's regex on every text."""
    rules = SafetyRules(extra_words=["a-b  c", "x.y", "ſ-q", "k+k", "(z)", "é-é", "s&m d", "\u212a-x"])
    lists = rules.lists()
    assert lists.odd and "ſ" in lists._matcher.odd_other  # a character folding to ASCII goes to the engine
    rng = np.random.default_rng(7)
    pieces = ["a", "A", "-", "b", "B", " ", "\t", "\x0b", "\x0c", "\n", "\r", "c", "C", "x", ".", "y", "S", "s",
              "&", "m", "M", "d", "G", "g", "-spot", "SPOT", "\u212a", "k", "+", "K", "(", "z", ")", "é", "É",
              "🖕", "ſ", "q", "\xa0", "\u3000"]  # fmt: skip
    matched = 0
    for _ in range(400):
        texts = ["".join(rng.choice(pieces, rng.integers(0, 14))) for _ in range(int(rng.integers(1, 12)))]
        arr = pa.array(texts, pa.large_string())
        want = pc.match_substring_regex(arr, lists.phrase_filter, ignore_case=True).to_numpy(zero_copy_only=False)
        assert lists._matcher.odd_phrases(arr, None).tolist() == want.tolist()
        matched += int(want.sum())
    assert matched > 100


def test_string_set_finds_exact_strings() -> None:
    values = ["", "a", "ab", "abc", "café", "CAFÉ", "字", *[f"w{i}" for i in range(3000)], "a"]
    found = StringSet(values)
    queries = ["a", "", "A", "abcd", "café", "cafe", "w2999", "w3000", "字", "ab"]
    assert found.find(pa.array(queries, pa.large_string())).tolist() == [
        values.index(q) if q in values else -1 for q in queries
    ]
    assert StringSet([]).find(pa.array(["a", ""])).tolist() == [-1, -1]


def test_toxicity_of_long_and_repetitive_texts_is_scikit_learn() -> None:
    """Rows of many distinct terms (the bitmap's several words) and repeated ones, ASCII and not."""
    from profanity_check.profanity_check import model, vectorizer

    terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(terms, 300)) for _ in range(5)]
    texts += [" ".join(rng.choice(terms[:40], 200)), "idiot " * 99, terms[-1] + " " + terms[0], "é " + terms[5]]
    texts += ["", " \t", "\u3000", "x", "—", "“ ”", "you’re an “idiot”… stupid—fool", "Ⓐss", "e\u0301vil idiot"]
    texts += ["\u3000".join(rng.choice(terms, 50)) + "’s", "ΣΑΣ idiot", "idiot²"]
    present = [i for i, t in enumerate(texts) if t and not t.isspace()]
    expected = np.zeros(len(texts))
    expected[present] = model.predict_proba(vectorizer.transform([texts[i] for i in present]))[:, 1]
    arr = pa.array(texts, pa.large_string())
    for got in (toxicity_scores(texts), toxicity_scores(arr, _split_words(arr, Words.split(arr)))):
        assert got.view(np.int64).tolist() == expected.view(np.int64).tolist()


def test_signals_from_arrow_texts_are_those_from_lists() -> None:
    texts = ["see http://blocked.example/x and www.ok.test", "blorgle", None, "", "café https://Blocked.Example"]
    metas = ['{"url": "https://a.blocked.example/p"}', "{}", None, '{"url": 3}', '{"url": "http://fine.test"}']
    rules = SafetyRules(check_text_urls=True, extra_domains=["blocked.example"], **LISTS)
    arr = pa.array(texts, pa.large_string())
    from_list = safety_signals(texts, metas, rules)
    assert from_list["safety_blocked_text_urls"].to_pylist() == [1, 0, 0, 0, 1]
    assert from_list["safety_blocked_domain"].to_pylist() == [True, False, False, False, False]
    for got in (safety_signals(arr, metas, rules), safety_signals(arr, metas, rules, arr, Batch(arr).words)):
        assert got.keys() == from_list.keys()
        for column in got:
            assert got[column].equals(from_list[column]), column


def test_reference_phrase_expression_is_the_lists_own() -> None:
    """The reference above reads the lists' compiled expression: check it is the one documented."""
    lists = SafetyRules(**LISTS).lists()
    assert lists.phrases is not None and lists.phrases.flags & re.IGNORECASE
    assert lists.phrases.findall("The ZORKMID \n scam") == ["ZORKMID \n scam"]
