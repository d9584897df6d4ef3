"""Quality-rule profiles by kind of source, on a held-out corpus: clean documentation of several kinds and junk.

The clean half is what a user brings, taken from this environment (not the bundled sample): the
docstrings of standard-library modules (text), the READMEs of installed distributions (Markdown)
and their licence texts. The junk half is the low-quality text a web crawl is full of: repeated
lines, lorem ipsum, keyword spam, navigation boilerplate, character garbage and another language.
With the defaults (the `document` profile for these formats) at least 90% of the clean documents
that reach the filter are kept and at least 95% of the junk is dropped; judged as web pages
instead (`source_kinds`), the web-crawl rules drop far more of the clean ones.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from test_incremental_equals_fresh import run

from refinery.flows.config import validate_config
from refinery.storage.documents import document_files, read_table

DOCSTRINGS = """
import importlib, json, pkgutil, sysconfig, warnings
warnings.simplefilter("ignore")
skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}
out = {}
for m in sorted(m.name for m in pkgutil.iter_modules([sysconfig.get_paths()["stdlib"]])):
    if m.startswith("_") or m in skip:
        continue
    try:
        doc = importlib.import_module(m).__doc__ or ""
    except Exception:
        continue
    if len(doc.split()) >= 60:
        out[m] = doc
print(json.dumps(out))
"""


def build_corpus(root: Path) -> tuple[Path, Path]:
    """`clean/` and `junk/` folders; see the module docstring."""
    clean, junk = root / "clean", root / "junk"
    clean.mkdir(parents=True)
    junk.mkdir(parents=True)
    # The docstrings come from a child process: importing every module would leave its side effects here.
    docs = json.loads(subprocess.run([sys.executable, "-c", DOCSTRINGS], capture_output=True, text=True,
                                     check=True, timeout=300).stdout)  # fmt: skip
    for mod, doc in docs.items():
        (clean / f"{mod}_doc.txt").write_text(doc)
    dists = sorted({d.metadata["Name"]: d for d in metadata.distributions() if d.metadata["Name"]}.items())
    readmes = licences = 0
    seen: set[str] = set()
    for name, dist in dists:
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
        if readmes < 30 and len(body.split()) > 150:
            (clean / f"{name}_README.md").write_text(body)
            readmes += 1
        for f in dist.files or []:
            if licences >= 12 or "LICEN" not in f.name.upper():
                continue
            try:
                text = f.read_text() or ""
            except (OSError, UnicodeDecodeError):
                continue
            key = " ".join(text.split()[:40])
            if len(text.split()) > 80 and key not in seen:
                seen.add(key)
                (clean / f"{name}_LICENSE.txt").write_text(text)
                licences += 1
                break
    rng = random.Random(0)
    nav = ["Home", "About us", "Products", "Contact", "Login", "Sign up", "Privacy policy", "Terms", "Careers", "Blog"]
    spam = ["cheap", "shoes", "buy", "best", "price", "discount", "sale", "online", "free", "shipping"]
    lorem = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
             "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut "
             "aliquip ex ea commodo consequat. ")  # fmt: skip
    german = ("Die Stadt liegt am Ufer des Flusses und hat eine lange Geschichte. Im Sommer kommen viele Besucher, "
              "um die alten Gebäude und die schönen Gärten zu sehen. Die Menschen hier arbeiten meistens in "
              "kleinen Betrieben. ")  # fmt: skip
    for i in range(5):
        (junk / f"repeated{i}.txt").write_text(f"Click here to subscribe to our newsletter, offer {i}.\n" * 40)
        (junk / f"lorem{i}.txt").write_text(lorem * (6 + i))
        (junk / f"spam{i}.md").write_text(" ".join(rng.choice(spam) for _ in range(300 + 20 * i)))
        (junk / f"nav{i}.txt").write_text("\n".join(" | ".join(rng.sample(nav, 5)) for _ in range(40)))
        (junk / f"garbage{i}.txt").write_text("".join(rng.choice("#$%&*@!~^{}[]<>|/=+_;:0123456789xyz") for _ in range(3000)))
        (junk / f"german{i}.md").write_text(german * (5 + i))
    return clean, junk


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("profiles")
    clean, junk = build_corpus(base / "corpus")
    return base, clean, junk


def outcome(root: Path, clean: Path, junk: Path) -> tuple[float, float, int]:
    """(share of the clean documents reaching the filter that it keeps, share of the junk dropped, clean count)."""
    def sources(stage: str) -> set[str]:
        return set(read_table(document_files(root / stage), columns=["source"]).column("source").to_pylist())

    reached, kept = sources("dedup"), sources("filter")
    clean_in = [p.as_uri() for p in clean.iterdir() if p.as_uri() in reached]  # licence texts can be duplicates
    junk_all = [p.as_uri() for p in junk.iterdir()]
    return (sum(u in kept for u in clean_in) / len(clean_in), sum(u not in kept for u in junk_all) / len(junk_all),
            len(clean_in))  # fmt: skip


def test_the_document_profile_keeps_clean_documentation_and_drops_junk(corpus) -> None:
    base, clean, junk = corpus
    sources = [str(clean), str(junk)]
    run(base / "root", sources, validate_config({"execution": {"progress": False}}))
    kept_clean, dropped_junk, n_clean = outcome(base / "root", clean, junk)
    assert n_clean >= 60, n_clean
    assert kept_clean >= 0.90, kept_clean
    assert dropped_junk >= 0.95, dropped_junk

    # The same documents judged as web pages: the web-crawl rules of C4 and FineWeb apply, at their thresholds.
    as_web = validate_config({"execution": {"progress": False},
                              "filter": {"source_kinds": {str(clean): "web", str(junk): "web"}}})  # fmt: skip
    run(base / "root", sources, as_web)
    web_clean, web_junk, _ = outcome(base / "root", clean, junk)
    assert web_clean < kept_clean - 0.2, (web_clean, kept_clean)
    assert web_junk >= 0.95
    manifest_metrics = read_table([base / "root" / "filter" / "dropped.parquet"], columns=["reason"]).column("reason")
    assert "c4_too_few_sentences" in manifest_metrics.to_pylist()  # a web-only rule, now judging them


def test_profiles_are_checked_and_are_selection_settings() -> None:
    from refinery.tasks.filter import FilterConfig

    cfg = FilterConfig()
    assert cfg.for_kind("c4", "document") is None and cfg.for_kind("c4", "web") is cfg.c4
    assert cfg.for_kind("gopher_quality", "document").min_alpha_words_frac == 0.6
    kinds = cfg.kinds(["html", "markdown", "code", "pdf", "jsonl"])
    assert list(kinds) == ["web", "document", "code", "document", "web"]
    custom = FilterConfig(source_kinds={"/data/crawl": "web"}, profiles={"web": {"c4": {"min_sentences": 3}}})
    assert list(custom.kinds(["markdown", "markdown"], ["file:///data/crawl/a.md", "file:///data/mine/b.md"])) == [
        "web", "document"]
    # A profile's thresholds are selection settings: the cached signals stay ...
    default = FilterConfig()
    looser = {**default.profiles, "web": {"c4": {"min_sentences": 3}}}
    assert FilterConfig(profiles=looser).signal_key() == default.signal_key()
    # ... while what decides which documents a family computes its signals for is part of the key: a family
    # switched on or off for a kind, and the settings that give documents their kind.
    assert custom.signal_key() != default.signal_key()  # c4 now judges documents too (no document profile)
    assert FilterConfig(source_kinds={"/data/crawl": "web"}).signal_key() != default.signal_key()
    assert default.judged_kinds()["c4"] == ("web",) and default.judged_kinds()["code"] == ("code",)
    assert default.judged_kinds()["safety"] == ("web", "document", "code")
    with pytest.raises(ValueError, match="not a rule family"):
        FilterConfig(profiles={"document": {"nonsense": {"enabled": False}}})
    with pytest.raises(ValueError, match="change how signals are computed"):
        FilterConfig(profiles={"document": {"gopher_quality": {"stop_words": ["a"]}}})
    with pytest.raises(ValueError, match="unknown settings"):
        FilterConfig(profiles={"web": {"c4": {"min_sentence": 3}}})
