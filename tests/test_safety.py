"""Safety filters: word and domain block lists, the toxicity classifier, per-rule and per-family drop counts,
replaceable lists, and the defaults' figures on the labelled set."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, document_files, read_table
from refinery.storage.manifest import config_hash
from refinery.tasks.filter import FilterConfig, run_filter
from refinery.tasks.quality import FAMILIES
from refinery.tasks.quality.safety import SafetyRules
from refinery.tasks.safety import (
    DEFAULT_DOMAINS,
    DEFAULT_WORDS,
    WORD_LISTS,
    load_lists,
    read_list,
    safety_signals,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a folder at the repository root, not part of the package
    sys.path.insert(0, str(ROOT))

from bench import safety as bench_safety  # noqa: E402

PLAIN = "The committee met on Tuesday to discuss the new library opening hours and the budget. "


def write_docs(directory: Path, docs: list[tuple[str, str, dict]]) -> list[Path]:
    rows = [
        {
            "id": i,
            "text": t,
            "source": f"mem://{i}",
            "format": "html" if meta else "text",
            "bytes": len(t),
            "meta": json.dumps(meta),
        }
        for i, t, meta in docs
    ]
    writer = PartWriter(directory, DOCUMENT_SCHEMA, rows_per_part=3)
    writer.write(rows)
    writer.close()
    return document_files(directory)


@pytest.fixture()
def lists(tmp_path: Path) -> dict[str, str]:
    """Small made-up lists, so the mechanism tests do not depend on the bundled ones."""
    words = tmp_path / "words.txt"
    words.write_text("# test words\nblorgle\nsnarfwobble\ngrimblefrotz\nzorkmid scam\n")
    domains = tmp_path / "domains.txt"
    domains.write_text("# test domains\nblocked.example\nspam-farm.invalid\ncontent-mill.test\n")
    return {"words_file": str(words), "domains_file": str(domains)}


def only_safety(**settings) -> FilterConfig:
    data = {f.name: {"enabled": f.name == "safety"} for f in FAMILIES}
    data["safety"].update(settings)
    return FilterConfig(pii={"enabled": False}, **data)


DOCS = [
    ("clean", PLAIN * 3, {}),
    ("word", PLAIN + "Then someone said BLORGLE loudly. " + PLAIN, {}),
    ("inflected", PLAIN + "The blorgles and snarfwobbled notes are not on the list. " + PLAIN, {}),
    ("phrase", PLAIN + "Beware the zorkmid\n  scam, said the clerk. " + PLAIN, {}),
    ("domain", PLAIN * 2, {"url": "https://news.Blocked.example/page?id=3"}),
    ("lookalike", PLAIN * 2, {"url": "https://notblocked.example/page"}),
    ("ok_url", PLAIN * 2, {"url": "https://docs.python.org/3/"}),
    ("text_url", PLAIN + "Read more at http://www.spam-farm.invalid/offer today. " + PLAIN, {}),
    ("both", PLAIN + "grimblefrotz " + PLAIN, {"url": "http://content-mill.test/a"}),
    ("toxic", "You are a worthless idiot and a pathetic loser, shut up.", {}),
]


def test_lists_and_classifier_drop_by_rule_and_counts_add_up(tmp_path: Path, lists: dict[str, str]) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    cfg = only_safety(check_text_urls=True, max_word_hits=0, **lists)
    result = run_filter(files, tmp_path / "out", cfg, progress=False)
    dropped = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "dropped.parquet").to_pylist()}
    assert {i: r["reason"] for i, r in dropped.items()} == {
        "word": "safety_blocklist_word",
        "phrase": "safety_blocklist_word",
        "domain": "safety_blocked_domain",
        "text_url": "safety_blocked_url_in_text",
        "both": "safety_blocked_domain",  # counted once, under the first rule it fails
        "toxic": "safety_toxicity",
    }
    kept = read_table(document_files(tmp_path / "out")).column("id").to_pylist()
    assert sorted(kept) == ["clean", "inflected", "lookalike", "ok_url"]
    c = result.counts
    assert c.dropped == dict(Counter(r["reason"] for r in dropped.values()))
    assert c.in_ == c.kept + c.dropped_total == len(DOCS)
    assert result.metrics["dropped_safety_blocklist_word"] == 2
    assert "'blorgle'" in dropped["word"]["detail"] and "news.blocked.example" in dropped["domain"]["detail"]
    assert "toxicity=" in dropped["toxic"]["detail"] and "max_toxicity=0.9" in dropped["toxic"]["detail"]
    # the stage report counts drops per family too: only safety is on, so it holds every drop
    assert result.metrics["dropped_family_safety"] == c.dropped_total == 6
    assert result.extra["dropped_by_family"] == {"safety": 6}


def test_text_urls_are_ignored_unless_asked_and_the_word_rule_is_off_by_default(
    tmp_path: Path, lists: dict[str, str]
) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    result = run_filter(files, tmp_path / "out", only_safety(**lists), progress=False)
    assert result.counts.dropped == {"safety_blocked_domain": 2, "safety_toxicity": 1}
    signals = pq.read_table(sorted((tmp_path / "out").glob("signals-*.parquet"))).to_pylist()
    assert {r["id"]: r["safety_word_hits"] for r in signals}["word"] == 1  # counted, not dropped


def test_word_matching_is_whole_word_and_case_insensitive_on_the_bundled_list() -> None:
    texts = [
        "Scunthorpe and Penistone are towns; Essex and Middlesex are counties.",
        "The class assessment over a cocktail: an analysis of grasshoppers and shiitake.",
        "What a FUCKING mess, you Bastard.",
        "Two girls\n one   cup and a date rape drug.",
        "The big black dog slept; blue waffles for breakfast.",
        "S&M clubs and the g-spot.",
        "It was big. Black clouds came in; a date, rape seed and rosy palm and her 5 sisters.",
    ]
    sig = safety_signals(texts, None, SafetyRules())
    # phrases match across whitespace, not punctuation; the longest listed phrase counts once
    assert sig["safety_word_hits"].to_pylist() == [0, 0, 2, 3, 1, 2, 2]
    shown = ["fucking", "two girls one cup", "big black", "s&m", "rosy palm and her 5 sisters"]
    assert sig["safety_first_word"].to_pylist()[2:] == shown
    assert len(read_list(DEFAULT_WORDS)) > 300 and (WORD_LISTS / "de.txt").is_file()
    german = load_lists(word_lists=["en", "de"])
    assert german.words > load_lists().words
    # the bundled UT1 subset blocks a listed domain and its subdomains, and nothing else
    assert load_lists().blocked_host("www.pokerstars.com") and load_lists().blocked_host("eu.bet365.com")
    assert not load_lists().blocked_host("docs.python.org")


def test_toxicity_column_is_a_score_and_its_threshold_reruns_only_selection(tmp_path: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    stage = tmp_path / "out"
    first = run_filter(files, stage, only_safety(), progress=False)
    assert first.metrics["signals_reused"] == 0.0
    signal_files = sorted(stage.glob("signals-*.parquet"))
    stamps = {p: os.stat(p).st_mtime_ns for p in signal_files}
    key = json.loads((stage / "signals.key.json").read_text())
    tox = {r["id"]: r["toxicity"] for r in pq.read_table(signal_files).to_pylist()}
    assert tox["toxic"] > 0.9 and all(0 <= v < 0.5 for i, v in tox.items() if i != "toxic")

    # Only the threshold changes: the signals are reused, not rewritten, and the decisions change.
    looser = run_filter(files, stage, only_safety(max_toxicity=None), progress=False)
    assert looser.metrics["signals_reused"] == 1.0
    assert {p: os.stat(p).st_mtime_ns for p in signal_files} == stamps
    assert json.loads((stage / "signals.key.json").read_text()) == key
    assert "safety_toxicity" in first.counts.dropped and "safety_toxicity" not in looser.counts.dropped

    # Turning the classifier off changes the signals (the column is then empty), so they are recomputed.
    off = run_filter(files, stage, only_safety(toxicity=False), progress=False)
    assert off.metrics["signals_reused"] == 0.0 and "safety_toxicity" not in off.counts.dropped


def test_count_and_fraction_thresholds(lists: dict[str, str]) -> None:
    import pyarrow as pa

    from refinery.tasks.filter import select

    texts = ["blorgle " + "word " * 9, "blorgle blorgle " + "word " * 98]
    sig = safety_signals(texts, None, SafetyRules(**lists))
    assert sig["safety_word_hits"].to_pylist() == [1, 2]
    assert sig["safety_word_frac"].to_pylist() == pytest.approx([0.1, 0.02])
    off = {"toxicity": False}
    by_count = only_safety(max_word_hits=1, **off)
    by_frac = only_safety(max_word_hits=None, max_word_frac=0.05, **off)
    table = pa.table(sig)
    assert select(table, ["text", "text"], by_count)[0] == [None, "safety_blocklist_word"]
    assert select(table, ["text", "text"], by_frac)[0] == ["safety_blocklist_word", None]
    assert select(table, ["text", "text"], only_safety(max_word_hits=None))[0] == [None, None]


def test_user_lists_replace_the_defaults(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# my list\nRhubarb\nmuddy boots\n")
    domains = tmp_path / "domains.txt"
    domains.write_text("# mine\nwww.Example.ORG\n")
    rules = SafetyRules(
        words_file=str(words), domains_file=str(domains), extra_words=["quux"], toxicity=False
    )
    sig = safety_signals(
        ["rhubarb pie", "fuck", "Muddy   Boots everywhere, quux", "x"],
        [None, None, None, json.dumps({"url": "https://shop.example.org/x"})],
        rules,
    )
    assert sig["safety_word_hits"].to_pylist() == [1, 0, 2, 0]
    assert sig["safety_blocked_domain"].to_pylist() == [False, False, False, True]


def test_editing_a_list_changes_the_config_hash_and_bad_values_name_the_key(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("alpha\n")
    cfg = FilterConfig(safety={"words_file": str(words)})
    before = config_hash(cfg)
    assert config_hash(FilterConfig.model_validate(cfg.model_dump(mode="json"))) == before
    words.write_text("alpha\nbeta\n")
    assert config_hash(cfg) != before
    with pytest.raises(ValidationError, match="safety.max_word_frac"):
        FilterConfig(safety={"max_word_frac": 2})
    with pytest.raises(ValidationError, match="safety.max_toxicity"):
        FilterConfig(safety={"max_toxicity": 1.5})
    with pytest.raises(ValidationError, match="safety.nope"):
        FilterConfig(safety={"nope": 1})
    with pytest.raises(FileNotFoundError, match="bundled: .*en"):
        SafetyRules(word_lists=["xx"]).lists()


def test_bundled_lists_are_real_commented_and_credited() -> None:
    for path in (DEFAULT_WORDS, DEFAULT_DOMAINS):
        assert len(read_list(path)) > 300
    assert "LDNOOBW" in DEFAULT_WORDS.read_text().splitlines()[0]
    domains = load_lists().domains
    assert len(domains) > 30_000 and all(not d.endswith((".example", ".invalid", ".test")) for d in domains)
    readme = (DEFAULT_WORDS.parent.parent / "README.md").read_text()
    for credit in ("CC-BY-4.0", "CC-BY-SA-4.0", "5faf2ba42d7b", "804da92a9177"):
        assert credit in readme


def test_labelled_set_figures_hold() -> None:
    """The defaults' precision and recall on the labelled set are at least what bench/RESULTS.md records."""
    rows = bench_safety.load()
    assert len(rows) >= 300 and {r["label"] for r in rows} == {0, 1}
    assert sum(r["kind"] == "lookalike" for r in rows) >= 100
    _, result = bench_safety.table(rows, SafetyRules().max_toxicity)
    classifier = result[f"classifier > {SafetyRules().max_toxicity}"]
    assert classifier["precision"] >= 0.9 and classifier["recall"] >= 0.64
    assert result["list (any match)"]["precision"] < 0.7  # why the word rule is off by default
