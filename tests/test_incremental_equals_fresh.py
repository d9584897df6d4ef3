"""An incremental run equals a fresh run, after any sequence of changes to the sources and the config.

A `hypothesis` state machine edits two source folders (text files and one JSON
Lines file of records) and the config, one operation per step: files added,
edited slightly or heavily, deleted, renamed, moved between the folders, near
copies added, records added, changed or removed, a dedup or filter threshold
moved either way. After each step the ingest, dedup and filter stages run
incrementally in one run root (skipping what `staleness` says is unchanged, as
the flow does) and from scratch in a new root, and both must keep and drop the
same documents for the same reasons.

CI runs a few sequences; set REFINERY_STATEFUL_EXAMPLES (e.g. 200) for a longer
local search.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from stage_runner import run_stages

from refinery.flows.config import validate_config
from refinery.flows.graph import Graph, input_digest, staleness
from refinery.flows.stages import PIPELINE
from refinery.storage.documents import document_files, read_table
from refinery.storage.manifest import read_manifest

STAGES = ("ingest", "dedup", "filter")
EXAMPLES = int(os.environ.get("REFINERY_STATEFUL_EXAMPLES", "5"))

WORDS = (
    "river stone bridge market village harbour summer winter garden letter window morning evening teacher "
    "doctor farmer engine valley forest mountain castle kitchen library lantern meadow orchard candle "
    "ladder pocket blanket thunder shadow silver copper marble"
).split()
GLUE = ["the", "and", "of", "to", "with", "that", "in", "on", "for", "was", "a", "by"]


def prose(seed: int, sentences: int) -> str:
    """English-like prose that passes the quality rules when long enough."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        n = rng.randint(8, 14)
        out.append(" ".join(rng.choice(WORDS if k % 2 else GLUE) for k in range(n)).capitalize() + ".")
    return " ".join(out)


def outcome(root: Path) -> dict[str, Any]:
    """What each stage kept, as (source, text) pairs, and dropped or quarantined, by (source, reason)."""
    result: dict[str, Any] = {}
    for stage in STAGES:
        d = root / stage
        kept = read_table(document_files(d), columns=["source", "text"]).to_pylist()
        result[f"{stage}.kept"] = Counter((r["source"], r["text"]) for r in kept)
        for name in ("dropped.parquet", "quarantine.parquet"):
            if (d / name).is_file():
                rows = read_table([d / name], columns=["source", "reason"]).to_pylist()
                result[f"{stage}.{name}"] = Counter((r["source"], r["reason"]) for r in rows)
    return result


def run(root: Path, sources: list[str], cfg: Any, graph: Graph = PIPELINE, ran: list[str] | None = None) -> dict[str, Any]:
    """Ingest, dedup and filter as the flow runs them (a current stage is skipped); what they kept and dropped."""
    run_stages(root, sources, cfg, STAGES, graph, ran)
    return outcome(root)


class IncrementalEqualsFresh(RuleBasedStateMachine):
    """Random edits of two source folders and of the config; incremental and fresh outcomes compared."""

    @initialize(n=st.integers(3, 6), seed=st.integers(0, 10_000))
    def start(self, n: int, seed: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="incremental-"))
        self.sources = [self.base / "books", self.base / "web"]
        for s in self.sources:
            s.mkdir()
        self.seed = seed
        self.counter = 0
        self.clock = 1_700_000_000_000_000_000  # file times move forward a second per write, like real edits
        for _ in range(n):
            self._write(self.sources[self._next() % 2] / f"f{self._next()}.txt", prose(self._next(), 12))
        self.records = [prose(self._next(), 10) for _ in range(4)]
        self._write_jsonl()
        self.config: dict[str, Any] = {
            "dedup": {"threshold": 0.8},
            "filter": {"gopher_quality": {"min_words": 50}},
            "execution": {"progress": False},
        }
        self.runs = 0

    def teardown(self) -> None:
        if hasattr(self, "base"):
            shutil.rmtree(self.base, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------
    def _next(self) -> int:
        self.counter += 1
        return self.seed * 1000 + self.counter

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text + "\n")
        self.clock += 1_000_000_000
        os.utime(path, ns=(self.clock, self.clock))

    def _write_jsonl(self) -> None:
        lines = "\n".join(json.dumps({"text": t}) for t in self.records)
        self._write(self.sources[1] / "records.jsonl", lines)

    def _files(self) -> list[Path]:
        return sorted(p for s in self.sources for p in s.glob("*.txt"))

    # -- operations on the sources ------------------------------------------------
    @rule(folder=st.integers(0, 1), sentences=st.sampled_from([3, 12, 20]))
    def add_file(self, folder: int, sentences: int) -> None:
        self._write(self.sources[folder] / f"f{self._next()}.txt", prose(self._next(), sentences))

    @precondition(lambda self: self._files())
    @rule(pick=st.integers(0, 1000), heavy=st.booleans())
    def edit_file(self, pick: int, heavy: bool) -> None:
        files = self._files()
        path = files[pick % len(files)]
        if heavy:
            text = prose(self._next(), 12)
        else:  # three words changed and one line added: a near copy of its old self
            words = path.read_text().split()
            for k in (3, 7, 11):
                if k < len(words):
                    words[k] = "changed"
            text = " ".join(words) + "\nOne more line was added at the end of the file."
        self._write(path, text)

    @precondition(lambda self: self._files())
    @rule(pick=st.integers(0, 1000))
    def delete_file(self, pick: int) -> None:
        files = self._files()
        files[pick % len(files)].unlink()

    @precondition(lambda self: self._files())
    @rule(pick=st.integers(0, 1000), move=st.booleans())
    def rename_or_move_file(self, pick: int, move: bool) -> None:
        files = self._files()
        path = files[pick % len(files)]
        folder = self.sources[(self.sources.index(path.parent) + move) % 2]
        path.rename(folder / f"f{self._next()}.txt")

    @precondition(lambda self: self._files())
    @rule(pick=st.integers(0, 1000), folder=st.integers(0, 1))
    def add_near_copy(self, pick: int, folder: int) -> None:
        files = self._files()
        words = files[pick % len(files)].read_text().split()
        words[len(words) // 2] = "different"
        self._write(self.sources[folder] / f"f{self._next()}.txt", " ".join(words))

    @rule(op=st.sampled_from(["add", "change", "remove"]), pick=st.integers(0, 1000))
    def edit_records(self, op: str, pick: int) -> None:
        if op == "add" or not self.records:
            self.records.append(prose(self._next(), 10))
        elif op == "change":
            self.records[pick % len(self.records)] = prose(self._next(), 10)
        else:
            self.records.pop(pick % len(self.records))
        self._write_jsonl()

    # -- operations on the config -------------------------------------------------
    @rule(threshold=st.sampled_from([0.5, 0.7, 0.8, 0.95]))
    def set_dedup_threshold(self, threshold: float) -> None:
        self.config["dedup"]["threshold"] = threshold

    @rule(min_words=st.sampled_from([20, 50, 120]))
    def set_filter_min_words(self, min_words: int) -> None:
        self.config["filter"]["gopher_quality"]["min_words"] = min_words

    # -- the contract ---------------------------------------------------------------
    @invariant()
    def incremental_equals_fresh(self) -> None:
        if not hasattr(self, "base"):
            return
        cfg = validate_config(self.config)
        sources = [str(s) for s in self.sources]
        incremental = run(self.base / "root", sources, cfg)
        self.runs += 1
        fresh_root = self.base / f"fresh-{self.runs}"
        fresh = run(fresh_root, sources, cfg)
        shutil.rmtree(fresh_root)
        assert incremental.keys() == fresh.keys()
        for key in fresh:
            assert incremental[key] == fresh[key], f"{key} differs after {self.runs} steps"


IncrementalEqualsFresh.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=5, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_incremental_run_equals_fresh_run = IncrementalEqualsFresh.TestCase


def _corpus(base: Path) -> list[str]:
    books, web = base / "books", base / "web"
    books.mkdir(parents=True)
    web.mkdir()
    for i in range(4):
        (books / f"b{i}.txt").write_text(prose(i, 12) + "\n")
    (web / "records.jsonl").write_text("\n".join(json.dumps({"text": prose(10 + i, 10)}) for i in range(3)) + "\n")
    return [str(books), str(web)]


CFG = {"execution": {"progress": False}}


def test_an_edited_file_and_an_edited_record_are_kept_like_a_fresh_run_keeps_them(tmp_path: Path) -> None:
    sources = _corpus(tmp_path / "src")
    cfg = validate_config(CFG)
    first = run(tmp_path / "root", sources, cfg)
    assert sum(first["filter.kept"].values()) == 7
    # Three words changed and a line added: a near copy of the file's earlier version.
    path = Path(sources[0]) / "b1.txt"
    words = path.read_text().split()
    words[3:6] = ["three", "changed", "words"]
    path.write_text(" ".join(words) + "\nAnd one more line at the end.\n")
    records = [json.loads(line)["text"] for line in (Path(sources[1]) / "records.jsonl").read_text().splitlines()]
    records[1] = records[1].replace("the", "a", 2) + " One more sentence."
    (Path(sources[1]) / "records.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in records) + "\n")
    incremental = run(tmp_path / "root", sources, cfg)
    assert incremental == run(tmp_path / "fresh", sources, cfg)
    kept = {text for _, text in incremental["dedup.kept"]}
    assert path.read_text().strip() in {t.strip() for t in kept} and records[1] in kept
    assert not incremental.get("dedup.dropped.parquet")


def test_a_copied_root_and_a_moved_source_keep_the_same_documents(tmp_path: Path) -> None:
    sources = _corpus(tmp_path / "src")
    cfg = validate_config(CFG)
    before = run(tmp_path / "root", sources, cfg)
    shutil.copytree(tmp_path / "root", tmp_path / "copy")
    copied = run(tmp_path / "copy", sources, cfg)
    assert copied == before
    shutil.move(tmp_path / "src", tmp_path / "moved")
    moved_sources = [str(tmp_path / "moved" / Path(s).name) for s in sources]
    moved = run(tmp_path / "copy", moved_sources, cfg)

    def texts(result: dict[str, Any], key: str) -> Counter:
        return Counter(text for (_, text), n in result[key].items() for _ in range(n))

    for stage in STAGES:
        assert texts(moved, f"{stage}.kept") == texts(before, f"{stage}.kept"), stage


def test_a_tampered_output_of_the_same_size_is_found_and_its_stage_reruns(tmp_path: Path) -> None:
    sources = _corpus(tmp_path / "src")
    cfg = validate_config(CFG)
    before = run(tmp_path / "root", sources, cfg)
    part = sorted((tmp_path / "root" / "filter").glob("part-*.parquet"))[0]
    original = part.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # the same size, other bytes
    part.write_bytes(bytes(data))
    stage = PIPELINE["filter"]
    manifest = read_manifest(part.parent)
    digest = input_digest(stage, {"dedup": read_manifest(tmp_path / "root" / "dedup").output_digest})
    assert staleness(stage, part.parent, manifest, digest, cfg.filter) == ["outputs missing or modified"]
    assert staleness(stage, part.parent, manifest, digest, cfg.filter, verify="size") == []  # what size-only misses
    assert run(tmp_path / "root", sources, cfg) == before
    assert part.read_bytes() == original


def test_new_stage_code_reruns_that_stage_and_everything_after_it(tmp_path: Path) -> None:
    sources = _corpus(tmp_path / "src")
    cfg = validate_config(CFG)
    ran: list[str] = []
    before = run(tmp_path / "root", sources, cfg, ran=ran)
    assert ran == list(STAGES)
    ran.clear()
    run(tmp_path / "root", sources, cfg, ran=ran)
    assert ran == []  # nothing changed: everything skipped
    upgraded = Graph(tuple(dataclasses.replace(s, version=s.version + 1) if s.name == "dedup" else s
                           for s in PIPELINE.stages))  # fmt: skip
    after = run(tmp_path / "root", sources, cfg, graph=upgraded, ran=ran)
    assert ran == ["dedup", "filter"] and after == before  # new code, the same documents here
