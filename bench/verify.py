"""What checking reused outputs costs: `execution.verify` sha256 (the default) against size only.

Before a stage is skipped, its recorded outputs are checked. `sha256` streams
every output file through SHA-256, so a file changed in place at the same size
is caught; `size` only stats the files. This writes a stage folder of
`--files` Parquet-sized files (`--gb` in all), then times both checks, the
sha256 one on a cold-ish and a warm page cache (best of `--repeat`), and prints
seconds and GB/s, so that the cost per run of a root of a given size can be
read off.

    python -m bench.verify [--gb 2] [--files 16] [--record]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import record
from refinery.storage.manifest import Counts, Manifest, OutputFile, file_sha256, verify_outputs


def write_stage(folder: Path, total_bytes: int, files: int) -> Manifest:
    """`files` files of random bytes and the manifest that lists them."""
    per_file = total_bytes // files
    block = os.urandom(1 << 20)
    outputs = []
    for i in range(files):
        path = folder / f"part-{i:05d}.parquet"
        with open(path, "wb") as f:
            left = per_file
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        outputs.append(OutputFile(path=path.name, rows=0, bytes=path.stat().st_size, sha256=file_sha256(path)))
    return Manifest(
        stage="bench", config={}, config_hash="", input_digest="", output_digest="", outputs=outputs,
        counts=Counts(**{"in": 0}, kept=0), timings={}, code_version="bench/1",
    )


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        assert fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="total size of the stage's outputs")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    total = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_stage(Path(tmp), total, args.files)
        size_s = timed(lambda: verify_outputs(tmp, manifest, check_sha256=False), args.repeat)
        sha_s = timed(lambda: verify_outputs(tmp, manifest, check_sha256=True), args.repeat)
    gb = total / 1e9
    lines = [
        f"### execution.verify: checking {gb:.1f} GB of reused outputs in {args.files} files (best of {args.repeat})",
        "",
        "| verify | seconds | GB/s | per 100 GB of outputs |",
        "|---|---|---|---|",
        f"| size | {size_s:.4f} | - | {size_s * 100 / gb:.2f} s |",
        f"| sha256 (default) | {sha_s:.2f} | {gb / sha_s:.2f} | {sha_s * 100 / gb / 60:.1f} min |",
        "",
        "The sha256 figure is on a warm page cache; from disk it is bounded by the disk's read rate as well.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
