"""Safety filters: word and domain block lists, per-rule drop counts that add up, replaceable lists."""

from __future__ import annotations

import json
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
from refinery.tasks.safety import DEFAULT_DOMAINS, DEFAULT_WORDS, read_list, safety_signals

PLAIN = "The committee met on Tuesday to discuss the new library opening hours and the budget. "


def write_docs(directory: Path, docs: list[tuple[str, str, dict]]) -> list[Path]:
    rows = [
        {"id": i, "text": t, "source": f"mem://{i}", "format": "html" if meta else "text", "bytes": len(t),
         "meta": json.dumps(meta)}
        for i, t, meta in docs
    ]
    writer = PartWriter(directory, DOCUMENT_SCHEMA, rows_per_part=3)
    writer.write(rows)
    writer.close()
    return document_files(directory)


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
]


def test_default_lists_drop_by_rule_and_counts_add_up(tmp_path: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    result = run_filter(files, tmp_path / "out", only_safety(check_text_urls=True), progress=False)
    dropped = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "dropped.parquet").to_pylist()}
    assert {i: r["reason"] for i, r in dropped.items()} == {
        "word": "safety_blocklist_word",
        "phrase": "safety_blocklist_word",
        "domain": "safety_blocked_domain",
        "text_url": "safety_blocked_url_in_text",
        "both": "safety_blocked_domain",  # counted once, under the first rule it fails
    }
    kept = read_table(document_files(tmp_path / "out")).column("id").to_pylist()
    assert sorted(kept) == ["clean", "inflected", "lookalike", "ok_url"]
    c = result.counts
    assert c.dropped == dict(Counter(r["reason"] for r in dropped.values()))
    assert c.in_ == c.kept + c.dropped_total == len(DOCS)
    assert result.metrics["dropped_safety_blocklist_word"] == 2
    assert "'blorgle'" in dropped["word"]["detail"] and "news.blocked.example" in dropped["domain"]["detail"]


def test_text_urls_are_ignored_unless_asked(tmp_path: Path) -> None:
    files = write_docs(tmp_path / "in", DOCS)
    result = run_filter(files, tmp_path / "out", only_safety(), progress=False)
    assert "safety_blocked_url_in_text" not in result.counts.dropped
    assert result.counts.dropped == {"safety_blocklist_word": 2, "safety_blocked_domain": 2}


def test_count_and_fraction_thresholds() -> None:
    texts = ["blorgle " + "word " * 9, "blorgle blorgle " + "word " * 98]
    sig = safety_signals(texts, None, SafetyRules())
    assert sig["safety_word_hits"].to_pylist() == [1, 2]
    assert sig["safety_word_frac"].to_pylist() == pytest.approx([0.1, 0.02])
    by_count = only_safety(max_word_hits=1)
    by_frac = only_safety(max_word_hits=None, max_word_frac=0.05)
    import pyarrow as pa

    from refinery.tasks.filter import select

    table = pa.table(sig)
    assert select(table, ["text", "text"], by_count)[0] == [None, "safety_blocklist_word"]
    assert select(table, ["text", "text"], by_frac)[0] == ["safety_blocklist_word", None]
    assert select(table, ["text", "text"], only_safety(max_word_hits=None))[0] == [None, None]


def test_user_lists_replace_the_defaults(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# my list\nRhubarb\nmuddy boots\n")
    domains = tmp_path / "domains.txt"
    domains.write_text("# mine\nwww.Example.ORG\n")
    rules = SafetyRules(words_file=str(words), domains_file=str(domains), extra_words=["quux"])
    sig = safety_signals(
        ["rhubarb pie", "blorgle", "Muddy   Boots everywhere, quux", "x"],
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
    with pytest.raises(ValidationError, match="safety.nope"):
        FilterConfig(safety={"nope": 1})


def test_default_lists_are_small_and_commented() -> None:
    for path in (DEFAULT_WORDS, DEFAULT_DOMAINS):
        head = path.read_text().splitlines()[0]
        assert head.startswith("#") and "replace" in path.read_text().lower()
        assert 0 < len(read_list(path)) < 50
    assert all(d.endswith((".example", ".invalid", ".test")) for d in read_list(DEFAULT_DOMAINS))
