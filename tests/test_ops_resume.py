"""Kill-and-resume: a stage killed with SIGKILL, then started again, ends exactly like an uninterrupted run.

Each run happens in a child process that does what the pipeline flow does
around a stage (drop the old manifest, sweep leftover temporaries, run the
stage function, write the manifest last). The child maps its batches through a
paced thread pool, so the parent can kill it part-way through a stage; a second
kill point is right after the stage function returns and before the manifest is
written, the last moment a crash can hit. After the kill no manifest exists and
every visible output file is complete; after the restart, every output file's
checksum, every count and the manifest's output digest equal those of a run
that was never interrupted, and no temporary or set-aside file is left behind.

Ingest is tested on a growing source folder (the incremental case, where the
previous outputs are set aside while the new ones are written); dedup on a
first run and, like the filter, on an incremental one (a grown input, with the
previous run's signature or signal cache in place). Tokenization and training have their own kill tests
(`test_encode.py`, `test_train.py`).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from refinery.sample_corpus import build_sample_corpus
from refinery.storage.atomic import TMP_PREFIX
from refinery.storage.manifest import MANIFEST_NAME, Manifest, read_manifest

CHILD = textwrap.dedent(
    """
    import concurrent.futures as cf, os, signal, sys, time
    from pathlib import Path

    from refinery.storage.atomic import sweep_temporaries
    from refinery.storage.documents import document_files
    from refinery.storage.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest

    stage, source, out, pace, kill_before_manifest = sys.argv[1:]
    out, pace = Path(out), float(pace)


    class Paced(cf.ThreadPoolExecutor):
        # A real executor whose tasks take a while, so the parent can kill the stage part-way.
        def submit(self, fn, *args, **kwargs):
            return super().submit(lambda *a, **k: (time.sleep(pace), fn(*a, **k))[1], *args, **kwargs)


    if stage == "ingest":
        from refinery.tasks.ingest import IngestConfig, run_ingest, source_digest

        cfg = IngestConfig(batch_files=1, ocr=False)
        digest = source_digest([source], cfg)
        body = lambda ex: run_ingest([source], out, cfg, progress=False, executor=ex)
    elif stage == "dedup":
        from refinery.tasks.dedup import DedupConfig, run_dedup

        cfg = DedupConfig(batch_size=8)
        digest = read_manifest(Path(source)).output_digest
        inputs = document_files(Path(source))
        body = lambda ex: run_dedup(inputs, out, cfg, progress=False, executor=ex)
    else:
        from refinery.tasks.filter import FilterConfig, run_filter

        cfg = FilterConfig(batch_size=16)
        digest = read_manifest(Path(source)).output_digest
        inputs = document_files(Path(source))
        body = lambda ex: run_filter(inputs, out, cfg, progress=False, executor=ex)

    # What the flow does before a stage: the stage is no longer complete; leftovers go.
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    sweep_temporaries(out)
    with Paced(1) as pool:
        result = body(pool)
    if kill_before_manifest == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(out, build_manifest(stage, cfg, digest, result, {"total": 0.0}))
    """
)


def _start(script: Path, stage: str, source: Path, out: Path, pace: float = 0.0, kill_before_manifest: bool = False):
    return subprocess.Popen(
        [sys.executable, str(script), stage, str(source), str(out), str(pace), "1" if kill_before_manifest else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _run(script: Path, stage: str, source: Path, out: Path) -> Manifest:
    proc = _start(script, stage, source, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    manifest = read_manifest(out)
    assert manifest is not None
    return manifest


def _kill_mid_stage(script: Path, stage: str, source: Path, out: Path, pace: float) -> None:
    """Start a paced run and SIGKILL it once it is writing its outputs."""
    proc = _start(script, stage, source, out, pace)
    deadline = time.monotonic() + 120
    while not any(out.rglob(TMP_PREFIX + "*")):  # an output is being written
        assert proc.poll() is None, f"the child ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.01)
    time.sleep(3 * pace)  # a few more batches in
    assert proc.poll() is None, "the child finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def _kill_before_manifest(script: Path, stage: str, source: Path, out: Path) -> None:
    proc = _start(script, stage, source, out, kill_before_manifest=True)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output[-4000:]


def _assert_incomplete_but_clean(out: Path) -> None:
    """After a kill: no manifest, and every visible Parquet output opens (only temporaries may be partial)."""
    assert not (out / MANIFEST_NAME).exists()
    for path in out.rglob("*.parquet"):
        if not path.name.startswith(TMP_PREFIX):
            pq.read_metadata(path)


def _assert_same(resumed: Manifest, reference: Manifest, out: Path) -> None:
    """Same files, rows and counts as the uninterrupted run, byte for byte, and nothing left over."""
    assert [(o.path, o.rows) for o in resumed.outputs] == [(o.path, o.rows) for o in reference.outputs]
    assert resumed.counts == reference.counts
    for got, want in zip(resumed.outputs, reference.outputs, strict=True):
        assert got.sha256 == want.sha256, got.path
    assert resumed.output_digest == reference.output_digest
    leftovers = [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or p.name in (".previous", ".work")]
    assert leftovers == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_sample_corpus(tmp_path_factory.mktemp("ops-resume") / "corpus", size="tiny").root


@pytest.fixture()
def child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


@pytest.mark.parametrize("kill", ["mid-stage", "before-manifest"])
def test_ingest_killed_on_a_growing_folder_resumes_to_the_same_outputs(corpus, child, tmp_path: Path, kill) -> None:
    # The folder starts without its code files; they arrive before the second run.
    src, held = tmp_path / "src", tmp_path / "held"
    shutil.copytree(corpus, src)
    shutil.move(src / "code", held)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for out in (reference, resumed):
        _run(child, "ingest", src, out)
    shutil.move(held, src / "code")

    expected = _run(child, "ingest", src, reference)
    assert expected.metrics["files_new"] > 0 and expected.metrics["files_unchanged"] > 0
    if kill == "mid-stage":
        _kill_mid_stage(child, "ingest", src, resumed, pace=0.1)
    else:
        _kill_before_manifest(child, "ingest", src, resumed)
    _assert_incomplete_but_clean(resumed)
    # Killed after its last output, the run left complete outputs that the restart carries over
    # whole; row groups depend on the rows alone, so they come out byte-identical.
    _assert_same(_run(child, "ingest", src, resumed), expected, resumed)


@pytest.mark.parametrize("kill", ["mid-stage", "before-manifest"])
def test_dedup_killed_resumes_to_the_same_outputs(corpus, child, tmp_path: Path, kill) -> None:
    ingest = tmp_path / "ingest"
    _run(child, "ingest", corpus, ingest)
    expected = _run(child, "dedup", ingest, tmp_path / "reference")
    assert expected.counts.dropped_total > 0  # the planted duplicates give it work

    resumed = tmp_path / "resumed"
    if kill == "mid-stage":
        _kill_mid_stage(child, "dedup", ingest, resumed, pace=0.3)
    else:
        _kill_before_manifest(child, "dedup", ingest, resumed)
    _assert_incomplete_but_clean(resumed)
    # Killed after its last output, the run left its signature index complete; the restart reads it
    # as the earlier runs' index and rewrites the same rows, byte for byte (row groups follow the rows).
    _assert_same(_run(child, "dedup", ingest, resumed), expected, resumed)


@pytest.fixture(scope="module")
def grown_input(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """Ingest outputs of a folder without its code files, and of the same folder with them."""
    base = tmp_path_factory.mktemp("grown")
    script = base / "child.py"
    script.write_text(CHILD)
    src, held = base / "src", base / "held"
    shutil.copytree(corpus, src)
    shutil.move(src / "code", held)
    small, grown = base / "ingest-small", base / "ingest-grown"
    _run(script, "ingest", src, small)
    shutil.move(held, src / "code")
    _run(script, "ingest", src, grown)
    return small, grown


@pytest.mark.parametrize("stage", ["dedup", "filter"])
def test_an_incremental_run_killed_resumes_to_the_uninterrupted_incremental_outputs(
    grown_input, child, tmp_path: Path, stage: str
) -> None:
    # The stage runs first on the smaller input, then incrementally on the grown one, with the
    # previous run's caches in place: killed part-way in one root and not in the other.
    small, grown = grown_input
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run(child, stage, small, reference)
    shutil.copytree(reference, resumed)
    expected = _run(child, stage, grown, reference)
    assert expected.counts.in_ > read_manifest(small).counts.kept
    _kill_mid_stage(child, stage, grown, resumed, pace=0.3)
    _assert_incomplete_but_clean(resumed)
    _assert_same(_run(child, stage, grown, resumed), expected, resumed)
