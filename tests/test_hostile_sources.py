"""A hostile source folder: links out of it, keys and cloud credentials in it, code full of IP-like versions.

Ingest reads nothing outside the source folder (the links become quarantine rows), the filter lets no
secret through, and code comes out byte for byte as it went in.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refinery.storage.documents import document_files, read_table
from refinery.tasks.filter import FilterConfig, run_filter
from refinery.tasks.ingest import QUARANTINE_FILE, IngestConfig, run_ingest
from refinery.tasks.ingest.sources import list_sources

PROSE = (
    "The river runs through the old town, and the people who live there have always depended on it. "
    "In the spring, the water rises with the melting snow, and the fishermen wait for the right moment "
    "to cast their nets.\n\n"
    "Most of the houses along the bank were built with stone from the nearby hills. They have survived "
    "floods, fires and the slow decay of the centuries. The town council meets every month to discuss "
    "the state of the bridges and the roads that connect the town with the rest of the valley.\n\n"
    "Visitors often remark that the place feels quiet. That is true in winter, when the market closes "
    "early and the streets are empty. In summer, however, the square is full of music and the cafes "
    "stay open late into the night.\n"
)
# Fake credentials of the right shape (random characters, never real ones).
AWS_ID = "AKIAJ7Q2MZ5RBW4KXN3D"
AWS_SECRET = "q8Vt3Lr0Zk/Hx2N+9mWcPy7Rb4Jd6Fs1Ug5Ea0Oi"
KEY_BODY = "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2Kx9Wq8Lp4Hn7Vc3Ry6Ud1Fg5Jb0Zs2Ne8Tk4Xa9Mo3Pq7Lw"
PRIVATE_KEY = (
    f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n{KEY_BODY[::-1]}\n-----END RSA PRIVATE KEY-----\n"
)
OUTSIDE_TEXT = (
    "root:x:0:0:root:/root:/bin/bash\nAWS_SECRET_ACCESS_KEY=outsideOUTSIDEoutside0123456789abcdefABCD\n"
)
CODE = (
    '"""Release metadata and buffer sizes."""\n\n'
    'version = "1.2.3.4"\n'
    "__version__ = '10.0.0.1'\n"
    'COMPAT = ["2.0.1.3", "v4.12.0.2"]\n'
    "BUFFER_SIZES = [1024, 2048, 4096]\n"
    "# sizes: 1024 2048 4096 8192\n"
    "LOOPBACK = '127.0.0.1'\n\n\n"
    "def largest(sizes: list[int]) -> int:\n"
    "    \"\"\"The largest buffer size, for the allocator.\"\"\"\n"
    "    return max(sizes)\n"
)


def rel(source: str) -> str:
    """A document's or quarantine row's path relative to the source root."""
    return source.rsplit("/root/", 1)[-1]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hostile")
    outside, root = base / "outside", base / "root"
    (outside / "private").mkdir(parents=True)
    (outside / "passwd").write_text(OUTSIDE_TEXT)
    (outside / "private" / "notes.txt").write_text(OUTSIDE_TEXT)
    (root / "src").mkdir(parents=True)
    (root / "docs").mkdir()
    os.symlink(outside / "passwd", root / "passwd.txt")  # a file link out of the root
    os.symlink(outside / "private", root / "mounted")  # a folder link out of the root
    os.symlink(os.path.join("..", "..", "outside", "passwd"), root / "docs" / "relative.txt")  # via ..
    (root / "docs" / "river.txt").write_text(PROSE)
    os.symlink(os.path.join("..", "docs", "river.txt"), root / "src" / "river_link.txt")  # stays inside
    (root / "id_rsa").write_text(PRIVATE_KEY)
    (root / "docs" / "setup.txt").write_text(
        PROSE + f"\nThe deploy user is set up with aws_access_key_id = {AWS_ID}\n"
        f"aws_secret_access_key = {AWS_SECRET}\n"
    )
    (root / "src" / "release.py").write_text(CODE)
    return {"root": root, "outside": outside, "run": base / "run"}


@pytest.fixture(scope="module")
def ingested(hostile: dict[str, Path]):
    stage = hostile["run"] / "ingest"
    result = run_ingest([str(hostile["root"])], stage, IngestConfig(workers=1), progress=False)
    return stage, result


def test_nothing_outside_the_root_is_read(hostile, ingested) -> None:
    root, outside = hostile["root"], hostile["outside"]
    stage, _ = ingested
    docs = read_table(document_files(stage)).to_pylist()
    assert all("root:x:0:0" not in d["text"] and "outsideOUTSIDE" not in d["text"] for d in docs)
    assert all(str(outside) not in d["source"] for d in docs)
    quarantine = {rel(r["source"]): r for r in read_table([stage / QUARANTINE_FILE]).to_pylist()}
    for name in ("passwd.txt", "mounted", "docs/relative.txt"):
        assert quarantine[name]["reason"] == "symlink_outside_root", name
    # A link whose target stays inside the root is still followed.
    sources = {rel(d["source"]) for d in docs}
    assert {"src/river_link.txt", "docs/river.txt", "src/release.py"} <= sources
    assert not any(s.startswith("mounted") for s in sources)
    assert (root / "passwd.txt").is_symlink()


def test_secrets_never_reach_the_output_and_code_is_unchanged(hostile, ingested) -> None:
    stage, _ = ingested
    out = hostile["run"] / "filter"
    res = run_filter(document_files(stage), out, FilterConfig(), progress=False)
    kept = read_table(document_files(out)).to_pylist()
    for doc in kept:
        for secret in (AWS_ID, AWS_SECRET, KEY_BODY, "PRIVATE KEY"):
            assert secret not in doc["text"]
    dropped = {rel(r["source"]): r for r in read_table([out / "dropped.parquet"]).to_pylist()}
    assert dropped["id_rsa"]["reason"] == "secret_detected" and "private_key" in dropped["id_rsa"]["detail"]
    assert dropped["docs/setup.txt"]["reason"] == "secret_detected"
    assert res.metrics["dropped_secret_detected"] == 2
    code = [d for d in kept if d["source"].endswith("/src/release.py")]
    assert len(code) == 1 and code[0]["format"] == "code"
    assert code[0]["text"].encode() == CODE.encode()  # versions, number runs and all, byte for byte
    assert res.metrics["pii_ip"] == 0 and res.metrics["pii_phone"] == 0


def test_redact_mode_keeps_the_document_without_its_secrets(hostile, ingested) -> None:
    stage, _ = ingested
    out = hostile["run"] / "filter-redact"
    res = run_filter(document_files(stage), out, FilterConfig(secrets={"drop": False}), progress=False)
    kept = {rel(d["source"]): d for d in read_table(document_files(out)).to_pylist()}
    setup = kept["docs/setup.txt"]["text"]
    assert AWS_ID not in setup and AWS_SECRET not in setup and setup.count("<SECRET>") == 2
    assert setup.startswith(PROSE)
    assert res.metrics["pii_secret"] >= 2 and "dropped_secret_detected" not in res.metrics


@pytest.mark.parametrize(
    ("policy", "followed"),
    [("all", {"passwd.txt", "mounted/notes.txt", "docs/relative.txt", "src/river_link.txt"}),
     ("inside", {"src/river_link.txt"}), (True, {"src/river_link.txt"}), ("none", set()), (False, set())],
)
def test_follow_symlinks_policies(hostile, policy, followed) -> None:
    cfg = IngestConfig(follow_symlinks=policy)
    listed = {sf.rel: sf for sf in list_sources([str(hostile["root"])], cfg)}
    links = {"passwd.txt", "mounted", "mounted/notes.txt", "docs/relative.txt", "src/river_link.txt"}
    assert {name for name, sf in listed.items() if name in links and sf.error is None} == followed
    if policy in ("inside", True):
        quarantined = {name for name, sf in listed.items() if sf.error}
        assert quarantined == {"passwd.txt", "mounted", "docs/relative.txt"}
        assert all(sf.error[0] == "symlink_outside_root" for sf in listed.values() if sf.error)


def test_bad_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="follow_symlinks"):
        IngestConfig(follow_symlinks="outside")
