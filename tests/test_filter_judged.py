"""A family's signals are computed only for the documents it judges, and decisions are the same as with all.

C4's and FineWeb's rules judge web pages (the `document` profile switches them off), the code family judges
code, the prose families everything else; the safety and secrets families judge every document.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from test_filter import DOCS, GOOD, write_docs

from refinery.storage.documents import document_files, read_table
from refinery.tasks.filter import FilterConfig, run_filter, select
from refinery.tasks.quality import compute_signals

MIXED = [
    *DOCS,
    ("page", GOOD, "html"),
    ("page_short", "Click here to subscribe to our newsletter.", "html"),
    ("page_lorem", "lorem ipsum dolor sit amet " * 40, "html"),
    ("page_placeholder", GOOD + " Lorem ipsum dolor.", "html"),  # C4's lorem ipsum rule: web pages only
    ("text_placeholder", GOOD + " Lorem ipsum dolor.", "text"),
]


def test_signals_are_null_where_a_family_does_not_judge_and_decisions_match_all_signals(tmp_path: Path) -> None:
    cfg = FilterConfig()
    files = write_docs(tmp_path / "in", MIXED)
    res = run_filter(files, tmp_path / "f", cfg, progress=False)
    signals = read_table(sorted((tmp_path / "f").glob("signals-*.parquet")))
    docs = read_table(files)
    assert signals.column("id").to_pylist() == docs.column("id").to_pylist()
    fmt = dict(zip(docs.column("id").to_pylist(), docs.column("format").to_pylist(), strict=True))
    rows = {r["id"]: r for r in signals.to_pylist()}
    for doc_id, f in fmt.items():
        row = rows[doc_id]
        web, code = f == "html", f == "code"
        assert (row["c4_sentences"] is not None) == web, (doc_id, f)  # C4 judges web pages only
        assert (row["lang_score"] is not None) == (not code), (doc_id, f)  # the prose families skip code
        assert row["toxicity"] is not None  # safety judges every document
    assert [k for k, v in rows.items() if v["code_max_line_length"] is not None] == ["code", "generated"]

    # The same decisions as when every family's signals are computed for every document.
    full = pa.table(compute_signals(docs.column("text").combine_chunks(), cfg.signal_families(),
                                    {"meta": docs.column("meta").combine_chunks()}))
    assert all(full.column(c).null_count == 0 for c in ("c4_sentences", "lang_score", "code_max_line_length"))
    reasons_full, _ = select(full, docs.column("format"), cfg)
    reasons, _ = select(signals, docs.column("format"), cfg)
    assert reasons == reasons_full
    assert sum(r is None for r in reasons) == res.counts.kept > 0
    by_id = dict(zip(docs.column("id").to_pylist(), reasons, strict=True))
    assert by_id["page_placeholder"] == "c4_lorem_ipsum" and by_id["text_placeholder"] is None

    # The kept documents carry the same (null where not judged) signal columns.
    kept = read_table(document_files(tmp_path / "f"))
    kept_md = [r for r in kept.to_pylist() if r["format"] in ("text", "markdown")]
    assert kept_md and all(r["c4_sentences"] is None and r["lang_score"] is not None for r in kept_md)


def test_a_batch_no_document_of_which_a_family_judges_gets_typed_null_columns() -> None:
    cfg = FilterConfig()
    texts = pa.array([GOOD, "# Title\n\n" + GOOD], pa.large_string())
    kinds = cfg.kinds(pa.array(["text", "markdown"]))
    out = pa.table(compute_signals(texts, cfg.signal_families(), {"meta": pa.array(["{}", "{}"])},
                                   cfg.judged_rows(kinds)))
    full = pa.table(compute_signals(texts, cfg.signal_families(), {"meta": pa.array(["{}", "{}"])}))
    assert out.schema == full.schema  # same columns and types, so every batch of a file has one schema
    for name in ("c4_sentences", "fineweb_line_punct_frac", "code_max_line_length"):
        assert out.column(name).null_count == 2
    for name in ("lang_score", "gopher_words", "toxicity"):
        assert out.column(name).equals(full.column(name))
    assert np.array_equal(out.column("safety_word_hits").to_numpy(), full.column("safety_word_hits").to_numpy())
