"""Dedup stage: normalisation, datasketch-identical signatures, exact/near duplicates, incremental runs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from refinery.storage.documents import DOCUMENT_SCHEMA, PartWriter, document_files, read_table
from refinery.tasks.dedup import DedupConfig, _Index, _set_jaccard, cluster_id, min_labels, run_dedup
from refinery.tasks.minhash import (
    MinHasher,
    band_hashes,
    datasketch_minhash,
    exact_jaccard,
    rensa_signatures,
    shingle_hashes,
)
from refinery.tasks.normalize import NormalizeConfig, normalize, normalize_words


def write_docs(directory: Path, texts: dict[str, str]) -> list[Path]:
    rows = [
        {"id": i, "text": t, "source": f"mem://{i}", "format": "text", "bytes": len(t), "meta": "{}"}
        for i, t in texts.items()
    ]
    writer = PartWriter(directory, DOCUMENT_SCHEMA, rows_per_part=4)
    writer.write(rows)
    writer.close()
    return document_files(directory)


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def pair_at(k: int, n: int = 100) -> tuple[str, str]:
    """Two texts sharing their first k of n distinct words: Jaccard of 5-shingles is (k-4)/(2(n-4)-(k-4))."""
    a = words("w", n)
    b = a[:k] + words("x", n - k)
    return " ".join(a), " ".join(b)


def test_normalize_folds_case_punctuation_whitespace_and_nfc():
    assert normalize("  Hello,\tWORLD!!  It's\n") == "hello world it s"
    assert normalize("Cafe\u0301") == normalize("Caf\u00e9") == "café"
    assert normalize("Café 2024", NormalizeConfig(strip_accents=True, fold_digits=True)) == "cafe 0"
    assert normalize("Hello, World", NormalizeConfig(lowercase=False, fold_punctuation=False)) == "Hello, World"
    assert normalize_words(["a  b", ""]).to_pylist() == [["a", "b"], []]


def test_signatures_equal_datasketch_minhash():
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a b c", "", "one two three four five six"]
    w = normalize_words(texts)
    h, o = shingle_hashes(w, 5)
    hasher = MinHasher(num_perm=64, seed=7)
    sigs = hasher.signatures(h, o)
    for i in range(len(texts)):
        ref = datasketch_minhash(h[o[i] : o[i + 1]], num_perm=64, seed=7)
        assert np.array_equal(ref.hashvalues, sigs[i])
    assert o[3] - o[2] == 0 and o[2] - o[1] == 1  # empty: no shingle; short: one shingle
    # Jaccard estimates agree with datasketch's own objects, and approximate the exact value.
    a, b = pair_at(90)
    w = normalize_words([a, b])
    h, o = shingle_hashes(w, 5)
    s = MinHasher(256, 1).signatures(h, o)
    ma, mb = datasketch_minhash(h[o[0] : o[1]], 256, 1), datasketch_minhash(h[o[1] : o[2]], 256, 1)
    est = float((s[0] == s[1]).mean())
    assert est == ma.jaccard(mb) == MinHasher(256, 1).lean(s[0]).jaccard(MinHasher(256, 1).lean(s[1]))
    exact = exact_jaccard(h[o[0] : o[1]], h[o[1] : o[2]])
    assert exact == pytest.approx(86 / 106)
    assert abs(est - exact) < 0.1


def test_exact_and_near_duplicates_either_side_of_threshold(tmp_path):
    hi_a, hi_b = pair_at(95)  # Jaccard 91/101 = 0.90 > 0.8
    lo_a, lo_b = pair_at(83)  # Jaccard 79/113 = 0.70 < 0.8
    lo_a, lo_b = lo_a.replace("w", "v"), lo_b.replace("w", "v").replace("x", "y")
    texts = {
        "a": hi_a, "b": hi_b, "c": lo_a, "d": lo_b,
        "e": "Some Unique TEXT, here!", "f": "some unique text here", "g": " ".join(words("z", 50)),
    }
    files = write_docs(tmp_path / "in", texts)
    res = run_dedup(files, tmp_path / "dedup", DedupConfig(), progress=False)
    assert res.counts.in_ == 7
    assert res.counts.dropped == {"near_duplicate": 1, "exact_duplicate": 1}
    assert res.counts.kept == 5
    res.counts.check("dedup")
    dropped = read_table([tmp_path / "dedup" / "dropped.parquet"]).to_pylist()
    by_id = {r["id"]: r for r in dropped}
    assert by_id["b"]["reason"] == "near_duplicate" and "kept=a" in by_id["b"]["detail"]
    assert "jaccard=0.901" in by_id["b"]["detail"]
    assert by_id["f"]["reason"] == "exact_duplicate" and by_id["f"]["detail"] == "kept=e"
    kept = read_table(document_files(tmp_path / "dedup")).to_pylist()
    clusters = {r["id"]: r["minhash_cluster"] for r in kept}
    assert set(clusters) == {"a", "c", "d", "e", "g"}
    assert clusters["a"] is not None and clusters["e"] is not None and clusters["a"] != clusters["e"]
    assert clusters["c"] is None and clusters["d"] is None and clusters["g"] is None
    assert set(read_table(document_files(tmp_path / "dedup")).column_names) >= set(DOCUMENT_SCHEMA.names)


def test_without_verification_bands_decide(tmp_path):
    a, b = pair_at(100 - 1)
    files = write_docs(tmp_path / "in", {"a": a, "b": b})
    cfg = DedupConfig(verify_jaccard=False, bands=16, rows=8)
    res = run_dedup(files, tmp_path / "dedup", cfg, progress=False)
    assert res.counts.dropped == {"near_duplicate": 1}
    assert res.metrics["bands"] == 16 and res.metrics["rows"] == 8


def decisions(stage: Path) -> tuple[set[str], dict[str, str]]:
    """(kept ids, dropped id -> reason) of a dedup stage directory."""
    kept = set(read_table(document_files(stage)).column("id").to_pylist())
    dropped = {r["id"]: r["reason"] for r in read_table([stage / "dropped.parquet"]).to_pylist()}
    return kept, dropped


def test_incremental_run_reuses_signatures_and_decides_on_the_current_input(tmp_path):
    base = {f"d{i}": " ".join(words(f"t{i}_", 60)) for i in range(6)}
    stage = tmp_path / "dedup"
    first = run_dedup(write_docs(tmp_path / "in1", base), stage, DedupConfig(), progress=False)
    assert first.counts.kept == 6 and first.metrics["signatures_computed"] == 6
    assert pq.ParquetFile(stage / "signatures.parquet").metadata.num_rows == 6

    near = base["d0"].split()
    near[-1] = "changed"
    new = {"n0": " ".join(near), "n1": " ".join(words("fresh", 60)), "n2": base["d3"].upper()}
    # Only the new documents now: the earlier ones are gone, so nothing is a duplicate of them.
    second = run_dedup(write_docs(tmp_path / "in2", new), stage, DedupConfig(), progress=False)
    assert second.counts.kept == 3 and not second.counts.dropped
    assert second.metrics["signatures_computed"] == 3 and second.metrics["index_size"] == 6
    assert pq.ParquetFile(stage / "signatures.parquet").metadata.num_rows == 3  # the cache follows the input

    # Both sets: the new documents reuse their signatures; the survivor is the earliest in input order.
    both = write_docs(tmp_path / "in1", base) + write_docs(tmp_path / "in2", new)
    third = run_dedup(both, stage, DedupConfig(), progress=False)
    assert third.metrics["signatures_reused"] == 3 and third.metrics["signatures_computed"] == 6
    assert third.counts.kept == 7 and third.counts.in_ == 9
    third.counts.check("dedup")
    detail = {r["id"]: r["detail"] for r in read_table([stage / "dropped.parquet"]).to_pylist()}
    assert detail["n0"].startswith("kept=d0") and detail["n2"] == "kept=d3"
    assert decisions(stage) == decisions_of_fresh(both, tmp_path / "fresh3")

    # Other signature settings ignore the cache (and rebuild it) instead of failing.
    fourth = run_dedup(both, stage, DedupConfig(shingle_size=3), progress=False)
    assert fourth.metrics["signatures_reused"] == 0 and fourth.metrics["signatures_computed"] == 9
    assert fourth.extra["signature_cache_ignored"] == "other signature settings"


def decisions_of_fresh(files: list[Path], stage: Path, cfg: DedupConfig | None = None) -> tuple[set[str], dict[str, str]]:
    run_dedup(files, stage, cfg or DedupConfig(), progress=False)
    return decisions(stage)


def test_an_edited_document_is_never_a_duplicate_of_its_own_earlier_version(tmp_path):
    base = {f"d{i}": " ".join(words(f"t{i}_", 60)) for i in range(6)}
    stage = tmp_path / "dedup"
    run_dedup(write_docs(tmp_path / "v1", base), stage, DedupConfig(), progress=False)
    edited = dict(base)
    text = base["d2"].split()
    text[10:13] = ["three", "new", "words"]
    edited["d2"] = " ".join(text) + " and one more line"  # same id, a near copy of its old text
    files = write_docs(tmp_path / "v2", edited)
    result = run_dedup(files, stage, DedupConfig(), progress=False)
    assert result.counts.kept == 6 and not result.counts.dropped
    assert result.metrics["signatures_reused"] == 5 and result.metrics["signatures_computed"] == 1
    assert decisions(stage) == decisions_of_fresh(files, tmp_path / "fresh")


def test_deleting_a_survivor_keeps_its_near_copy_and_a_tighter_threshold_reclusters(tmp_path):
    a, b = pair_at(95)  # Jaccard 0.90
    texts = {"a": a, "b": b, "c": " ".join(words("c", 60))}
    stage = tmp_path / "dedup"
    run_dedup(write_docs(tmp_path / "v1", texts), stage, DedupConfig(), progress=False)
    assert decisions(stage)[1] == {"b": "near_duplicate"}
    del texts["a"]  # the survivor's file is deleted: its copy is now unique
    files = write_docs(tmp_path / "v2", texts)
    run_dedup(files, stage, DedupConfig(), progress=False)
    assert decisions(stage) == ({"b", "c"}, {})
    texts["a"] = a
    files = write_docs(tmp_path / "v3", texts)
    run_dedup(files, stage, DedupConfig(threshold=0.95), progress=False)  # tighter: 0.90 is no longer a duplicate
    assert decisions(stage) == ({"a", "b", "c"}, {})
    assert decisions(stage) == decisions_of_fresh(files, tmp_path / "fresh", DedupConfig(threshold=0.95))


def test_a_tampered_signature_cache_is_ignored(tmp_path):
    texts = {f"d{i}": " ".join(words(f"t{i}_", 60)) for i in range(4)}
    files = write_docs(tmp_path / "in", texts)
    stage = tmp_path / "dedup"
    run_dedup(files, stage, DedupConfig(), progress=False)
    cache = stage / "signatures.parquet"
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    cache.write_bytes(bytes(data))
    again = run_dedup(files, stage, DedupConfig(), progress=False)
    assert again.extra["signature_cache_ignored"] == "checksum mismatch"
    assert again.metrics["signatures_reused"] == 0 and again.metrics["signatures_computed"] == 4


def test_executor_gives_identical_outputs(tmp_path):
    texts = {f"d{i}": " ".join(words(f"k{i % 5}_", 40 + i % 3)) for i in range(20)}
    files = write_docs(tmp_path / "in", texts)
    cfg = DedupConfig(batch_size=3)
    serial = run_dedup(files, tmp_path / "a", cfg, progress=False)
    with ThreadPoolExecutor(2) as pool:
        parallel = run_dedup(files, tmp_path / "b", cfg, progress=False, executor=pool)
    assert serial.counts == parallel.counts
    assert {o.path: o.sha256 for o in serial.outputs} == {o.path: o.sha256 for o in parallel.outputs}


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="bands"):
        DedupConfig(bands=10)
    with pytest.raises(ValidationError, match="threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValidationError, match="shingles"):
        DedupConfig(shingles=3)
    assert DedupConfig(threshold=0.8, num_perm=128).lsh_params() == (14, 9)


# --- The global step's memory design: numpy union-find, batched Jaccard, streamed decisions. ---


def reference_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Plain union-find: each node's smallest connected node."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=120))))
def test_min_labels_equals_a_reference_union_find(graph):
    n, edges = graph
    a = np.array([e[0] for e in edges], np.int64)
    b = np.array([e[1] for e in edges], np.int64)
    assert min_labels(n, a, b).tolist() == reference_components(n, edges)


def test_min_labels_on_a_long_chain_and_a_star():
    n = 5000
    order = np.random.default_rng(3).permutation(n)  # a path visiting the nodes in random order
    labels = min_labels(n, order[:-1], order[1:])
    assert (labels == 0).all()
    star = min_labels(n, np.full(n - 1, n - 1), np.arange(n - 1))
    assert (star == 0).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sets(st.integers(0, 40), max_size=30), st.sets(st.integers(0, 40), max_size=30)),
                min_size=1, max_size=30))
def test_batched_set_jaccard_equals_exact_jaccard(pairs):
    def lists(sets: list[set[int]]) -> pa.ListArray:
        return pa.array([sorted(s) for s in sets], pa.list_(pa.uint32()))

    got = _set_jaccard(lists([p[0] for p in pairs]), lists([p[1] for p in pairs]))
    want = [exact_jaccard(np.array(sorted(x), np.uint32), np.array(sorted(y), np.uint32)) for x, y in pairs]
    assert got.tolist() == want  # the same float, bit for bit: the threshold comparison must not move


def reference_dedup(texts: dict[str, str], cfg: DedupConfig) -> tuple[dict[str, str], dict[str, str | None]]:
    """The dedup contract in plain Python on small data: (dropped id -> kept id, kept id -> its cluster's survivor).

    Same normalisation, signatures and band keys as the stage; candidate pairs from every shared bucket (buckets
    stay under `max_bucket_pairs` here), the exact Jaccard check, a union-find, survivor = smallest source URI.
    """
    ids = sorted(texts, key=lambda i: f"mem://{i}")  # node order: source URI
    words = normalize_words([texts[i] for i in ids], cfg.normalize)
    norm = [" ".join(w) for w in words.to_pylist()]
    h, o = shingle_hashes(words, cfg.shingle_size)
    sigs = MinHasher(cfg.num_perm, cfg.seed).signatures(h, o)
    bands, rows = cfg.lsh_params()
    keys = band_hashes(sigs, bands, rows)
    rep = {}
    for k, t in enumerate(norm):
        rep.setdefault(t, k)
    reps = sorted(set(rep.values()))
    buckets: dict[tuple[int, int], list[int]] = {}
    for k in reps:
        if o[k + 1] > o[k]:
            for j in range(bands):
                buckets.setdefault((j, int(keys[k, j])), []).append(k)
    edges = set()
    for members in buckets.values():
        assert len(members) <= cfg.max_bucket_pairs
        for x in members:
            for y in members:
                if x < y and exact_jaccard(h[o[x] : o[x + 1]], h[o[y] : o[y + 1]]) >= cfg.threshold:
                    edges.add((x, y))
    root = reference_components(len(ids), sorted(edges))
    final = [root[rep[norm[k]]] for k in range(len(ids))]
    size = {r: final.count(r) for r in set(final)}
    dropped = {ids[k]: ids[final[k]] for k in range(len(ids)) if final[k] != k}
    kept = {ids[k]: (ids[k] if size[final[k]] > 1 else None) for k in range(len(ids)) if final[k] == k}
    return dropped, kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_step_equals_a_plain_python_reference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    vocab = [f"v{i}" for i in range(400)]
    texts: dict[str, str] = {}
    for g in range(12):  # groups of edited copies: chains of small edits, exact copies, unrelated documents
        base = list(rng.choice(vocab, size=int(rng.integers(30, 70))))
        texts[f"g{g}_0"] = " ".join(base)
        for c in range(1, int(rng.integers(1, 5))):
            kind = rng.integers(0, 3)
            if kind == 0:
                texts[f"g{g}_{c}"] = " ".join(base).upper()  # an exact duplicate after normalisation
            else:
                base = list(base)
                base[int(rng.integers(0, len(base)))] = str(rng.choice(vocab))
                if kind == 2:
                    base.append(str(rng.choice(vocab)))
                texts[f"g{g}_{c}"] = " ".join(base)
    texts["empty"] = ""
    texts["also_empty"] = "   "
    shuffled = dict(sorted(texts.items(), key=lambda kv: rng.random()))  # input order is not node order
    cfg = DedupConfig(batch_size=7)
    files = write_docs(tmp_path / "in", shuffled)
    run_dedup(files, tmp_path / "dedup", cfg, progress=False)
    want_dropped, want_kept = reference_dedup(texts, cfg)
    got_dropped = {r["id"]: r["detail"].split()[0].removeprefix("kept=")
                   for r in read_table([tmp_path / "dedup" / "dropped.parquet"]).to_pylist()}
    assert got_dropped == want_dropped
    assert len(want_dropped) >= 10  # the corpus does exercise clusters
    kept = {r["id"]: r["minhash_cluster"] for r in read_table(document_files(tmp_path / "dedup")).to_pylist()}
    assert set(kept) == set(want_kept)
    assert kept == {i: (None if s is None else cluster_id(s)) for i, s in want_kept.items()}


def test_signature_cache_lookup_with_repeated_ids(tmp_path):
    """The numpy cache index: an id found twice in the cache reuses the last entry's hash, as a dict would."""
    a, b = " ".join(words("p", 40)), " ".join(words("q", 40))
    stage = tmp_path / "dedup"
    stage.mkdir()
    cfg = DedupConfig()
    run_dedup(write_docs(tmp_path / "in", {"x": a, "y": b}), stage, cfg, progress=False)
    index = _Index(stage, cfg)
    entry, known = index.lookup(pa.array(["y", "zz", "x"]))
    assert entry.tolist() == [1, -1, 0]
    assert known[1] is None and known[0] != known[2] and len(known[0]) == 16


def test_rensa_backend_signs_differently_but_decides_alike(tmp_path):
    hi_a, hi_b = pair_at(95)
    texts = {"a": hi_a, "b": hi_b, "c": " ".join(words("c", 60)), "d": hi_a.upper(), "e": ""}
    files = write_docs(tmp_path / "in", texts)
    w = normalize_words([hi_a])
    h, o = shingle_hashes(w, 5)
    assert not np.array_equal(rensa_signatures(h, o, 64, 1), MinHasher(64, 1).signatures(h, o))
    empty = rensa_signatures(*shingle_hashes(normalize_words(["", "x y"]), 5), 64, 1)
    assert (empty[0] == 0xFFFFFFFF).all() and not (empty[1] == 0xFFFFFFFF).all()
    stage = tmp_path / "dedup"
    numpy_run = decisions_of_fresh(files, tmp_path / "numpy")
    run_dedup(files, stage, DedupConfig(minhash_backend="rensa"), progress=False)
    assert decisions(stage) == numpy_run == ({"a", "c", "e"}, {"b": "near_duplicate", "d": "exact_duplicate"})
    # The cache records the scheme: switching backends never mixes signatures.
    again = run_dedup(files, stage, DedupConfig(), progress=False)
    assert again.extra["signature_cache_ignored"] == "other signature settings"
