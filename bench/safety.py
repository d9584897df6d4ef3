"""Safety filter measured: precision and recall of the word list and the toxicity classifier on a labelled set.

The set (`tests/data/safety_labelled.jsonl`, one `{"text", "kind", "label"}` per line) holds short documents
written for this benchmark: label 1 are insults (with and without swear words) and obscene or sexually
explicit text; label 0 are ordinary sentences (some rude about things, not people: "the service was
terrible", "damn, I forgot my keys") and look-alikes: place names (Scunthorpe, Penistone, Middlesex), words
that contain listed ones (assessment, cocktail, analysis), medical, legal and biological terms (anal fissure,
rape kit evidence, great tits), and scholarship or teaching that quotes slurs and swear words.

Every document goes through the filter's own signal code (`refinery.tasks.safety.safety_signals`, default
lists); "list" flags a document with a block-list match (the default `max_word_hits: 0`), "classifier > t"
one whose `toxicity` score exceeds t, "list or classifier" either. The set was written before the detectors
were run on it and not edited after: the figures are what they give, not a tuning target.

    python -m bench.safety            # print the table
    python -m bench.safety --errors   # also list every misclassified document
    python -m bench.safety --record   # replace this benchmark's block in bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "safety_labelled.jsonl"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
HEADING = "## Safety filter: precision and recall (python -m bench.safety)"


def load(path: Path = DATA) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scores(rows: list[dict[str, object]]) -> tuple[np.ndarray, np.ndarray]:
    """Block-list matches and toxicity per document, from the filter's signal code with default settings."""
    from refinery.tasks.quality.safety import SafetyRules
    from refinery.tasks.safety import safety_signals

    sig = safety_signals([str(r["text"]) for r in rows], None, SafetyRules())
    return sig["safety_word_hits"].to_numpy(), sig["toxicity"].to_numpy()


def detectors(hits: np.ndarray, tox: np.ndarray, default: float) -> dict[str, np.ndarray]:
    """Each detector's decision per document: the list, the classifier at several thresholds, both."""
    out = {"list (any match)": hits > 0}
    out.update({f"classifier > {t}": tox > t for t in THRESHOLDS})
    out[f"list or classifier > {default}"] = (hits > 0) | (tox > default)
    out[f"list and classifier > {default}"] = (hits > 0) & (tox > default)
    return out


def measure(flagged: np.ndarray, rows: list[dict[str, object]]) -> dict[str, float]:
    label = np.array([r["label"] == 1 for r in rows])
    kind = np.array([r["kind"] for r in rows])
    tp, fp, fn = int((flagged & label).sum()), int((flagged & ~label).sum()), int((~flagged & label).sum())
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "lookalikes": int((flagged & (kind == "lookalike")).sum()),
        "insults_no_word": int((flagged & (kind == "insult_no_list_word")).sum()),
    }


def table(rows: list[dict[str, object]], default: float) -> tuple[str, dict[str, dict[str, float]]]:
    hits, tox = scores(rows)
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("lookalike", "insult_no_list_word")}
    result = {name: measure(f, rows) for name, f in detectors(hits, tox, default).items()}
    lines = [
        f"{len(rows)} labelled documents, {sum(r['label'] == 1 for r in rows)} toxic or obscene; "
        f"{kinds['lookalike']} clean look-alikes, {kinds['insult_no_list_word']} insults without a listed word",
        "",
        "| detector | TP | FP | FN | precision | recall | look-alikes flagged | insults without a listed word caught |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result.items():
        lines.append(
            f"| {name} | {m['tp']} | {m['fp']} | {m['fn']} | {m['precision']:.3f} | {m['recall']:.3f} "
            f"| {m['lookalikes']}/{kinds['lookalike']} | {m['insults_no_word']}/{kinds['insult_no_list_word']} |"
        )
    return "\n".join(lines), result


def errors(rows: list[dict[str, object]], default: float) -> list[str]:
    """The list's and the default classifier's misclassified documents, to read what each gets wrong."""
    hits, tox = scores(rows)
    out = []
    for i, r in enumerate(rows):
        positive = r["label"] == 1
        for name, hit in (("list", hits[i] > 0), (f"clf>{default}", tox[i] > default)):
            if hit != positive:
                out.append(f"{name:8s} {'FP' if hit else 'FN'} tox={tox[i]:.2f} {str(r['text'])[:90]!r}")
    return out


def record_block(text: str) -> None:
    """Replace this benchmark's earlier block in bench/RESULTS.md (if any), then append the new one."""
    from bench.common import RESULTS, record

    if RESULTS.is_file():
        lines = RESULTS.read_text(encoding="utf-8").split("\n")
        if HEADING in lines:
            start = lines.index(HEADING)
            end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("#")), len(lines))
            while start > 0 and not lines[start - 1].strip():
                start -= 1
            RESULTS.write_text("\n".join(lines[:start] + lines[end:]).rstrip("\n") + "\n", encoding="utf-8")
    record(text, "alt-profanity-check", "scikit-learn", "pyarrow")


def main() -> None:
    from refinery.tasks.quality.safety import TOXICITY_THRESHOLD

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--threshold",
        type=float,
        default=TOXICITY_THRESHOLD,
        help="classifier threshold of the combined rows",
    )
    ap.add_argument("--errors", action="store_true", help="also list every misclassified document")
    ap.add_argument(
        "--record", action="store_true", help="replace this benchmark's block in bench/RESULTS.md"
    )
    args = ap.parse_args()
    rows = load()
    t0 = time.perf_counter()
    text, _ = table(rows, args.threshold)
    print(text)
    print(f"\n({time.perf_counter() - t0:.1f} s including loading the classifier)")
    if args.record:
        record_block(f"{HEADING}\n\n{text}")
    if args.errors:
        print("\n".join(errors(rows, args.threshold)) or "no errors")


if __name__ == "__main__":
    main()
