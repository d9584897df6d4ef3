"""Quality rules: every rule on hand-written documents, and threshold boundaries in the selection."""

from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.tasks.filter import FilterConfig, select
from refinery.tasks.quality import FAMILIES, compute_signals

NAMES = [f.name for f in FAMILIES]
# (family name, rule) in the order they are checked
RULES = [(f.name, r) for f in FAMILIES for r in f.rules]

GOOD = (
    "The river runs through the old town, and the people who live there have always depended on it. "
    "In the spring, the water rises with the melting snow, and the fishermen wait for the right moment "
    "to cast their nets.\n\n"
    "Most of the houses along the bank were built with stone from the nearby hills. They have survived "
    "floods, fires and the slow decay of the centuries. The town council meets every month to discuss "
    "the state of the bridges and the roads that connect the town with the rest of the valley.\n\n"
    "Visitors often remark that the place feels quiet. That is true in winter, when the market closes "
    "early and the streets are empty. In summer, however, the square is full of music and the cafes "
    "stay open late into the night."
)


def decide(text: str, family: str, fmt: str = "html", **limits) -> str | None:
    """The drop reason for one web page with only `family` enabled (and `limits` overriding its settings)."""
    data = {f: {"enabled": f == family} for f in NAMES}
    data[family].update(limits)
    cfg = FilterConfig(**data)
    signals = pa.table(compute_signals(pa.array([text]), cfg.families()))
    return select(signals, [fmt], cfg)[0][0]


def test_good_prose_passes_every_family():
    for family in NAMES:
        if family != "code":
            assert decide(GOOD, family) is None, family


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("The cat sat on the mat and that was all.", "gopher_word_count"),
        (" ".join(["a", "of", "the", "is", "to"] * 20), "gopher_mean_word_length"),
        (" ".join(["the", "and", "incomprehensibilitiesness"] * 30), "gopher_mean_word_length"),
        ("#tag #the #and #word " * 30, "gopher_symbol_word_ratio"),
        ("\n".join(["- the item and thing number"] * 20), "gopher_bullet_lines"),
        ("\n".join(["the story and then it went on and on for a long while in the town..."] * 20), "gopher_ellipsis_lines"),
        (" ".join(["the", "and", "1234", "5678", "99", "00", "--"] * 15), "gopher_alpha_words"),
        (" ".join(["river", "stone", "water", "people", "bridge"] * 20), "gopher_stop_words"),
    ],
)
def test_gopher_quality_rules_fail(text, code):
    assert decide(text, "gopher_quality") == code


def test_gopher_word_count_boundary():
    text = " ".join(["the", "and", "river", "stone", "bridge"] * 10)  # exactly 50 words
    assert decide(text, "gopher_quality") is None
    assert decide(text, "gopher_quality", min_words=51) == "gopher_word_count"
    assert decide(text, "gopher_quality", max_words=49) == "gopher_word_count"
    assert decide(text + " extra", "gopher_quality", max_words=50) == "gopher_word_count"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("\n\n".join(["The same paragraph repeats itself here."] * 6 + [GOOD]), "gopher_dup_para_frac"),
        (
            "\n\n".join([GOOD] + [f"Short note number {i}." for i in range(10)] + [GOOD.split("\n\n")[1]] * 2),
            "gopher_dup_para_chars",
        ),
        ("\n".join(["same line", "other line"] * 10), "gopher_dup_line_frac"),
        ("\n".join([GOOD.replace("\n\n", " ")] + [f"Line {i}." for i in range(5)]
                   + ["The one long line that is repeated twice over here, " * 10] * 2),
         "gopher_dup_line_chars"),
    ],
)
def test_gopher_repetition_rules_fail(text, code):
    assert decide(text, "gopher_repetition") == code


def test_gopher_repetition_ngram_rules():
    rep = "the river runs by the town " * 40
    assert decide(rep, "gopher_repetition") == "gopher_top_2gram"
    assert decide(rep, "gopher_repetition", max_top_2gram_char_frac=1.0, max_top_3gram_char_frac=1.0,
                  max_top_4gram_char_frac=1.0) == "gopher_dup_5gram"
    assert decide(GOOD, "gopher_repetition") is None


def test_c4_rules():
    assert decide(GOOD, "c4") is None
    assert decide(GOOD + "\nLorem ipsum dolor sit amet, consectetur.", "c4") == "c4_lorem_ipsum"
    assert decide(GOOD + "\nThe set {a, b} is small.", "c4") == "c4_curly_bracket"
    assert decide(GOOD + "\nThe set {a, b} is small.", "c4", drop_curly_bracket=False) is None
    assert decide("One sentence here. Two sentences here.", "c4") == "c4_too_few_sentences"
    # Lines without terminal punctuation or with too few words do not count as sentences.
    assert decide("\n".join(["a heading without a stop"] * 10 + ["Too short."] * 10), "c4") == "c4_too_few_sentences"
    five = "This is one. This is two. This is three. This is four. This is five."
    assert decide(five, "c4") is None
    assert decide(five, "c4", min_sentences=6) == "c4_too_few_sentences"


def test_fineweb_rules():
    assert decide(GOOD, "fineweb") is None
    headings = "\n".join(f"A heading about topic number {i} and more words here" for i in range(20))
    assert decide(headings, "fineweb") == "fineweb_line_punct"
    short = "\n".join(["Short line."] * 3 + [f"Item {i}." for i in range(10)])
    assert decide(short + "\n" + GOOD, "fineweb", max_dup_line_char_frac=1.0) == "fineweb_short_lines"
    dup = GOOD + "\n" + "\n".join(["This sentence is repeated on purpose, many times over."] * 3)
    assert decide(dup, "fineweb") == "fineweb_dup_line_chars"
    listy = "\n".join(f"Word {i}." for i in range(30))
    assert decide(listy, "fineweb", max_short_line_frac=1.0) == "fineweb_list_like"


def test_language_rule():
    assert decide(GOOD, "language") is None
    french = "Le chat est assis sur le tapis et regarde la pluie tomber doucement sur la ville. " * 5
    assert decide(french, "language") == "lang_below_threshold"
    assert decide(french, "language", languages=["en", "fr"]) is None
    assert decide(french, "language", languages=[]) is None


def test_code_rules_and_prose_rules_do_not_mix():
    source = "import os\n\n\ndef main() -> None:\n    print(os.getcwd())\n\n\nif __name__ == '__main__':\n    main()\n"
    assert decide(source, "code", fmt="code") is None
    assert decide(source, "gopher_quality", fmt="code") is None  # prose rules skip code
    assert decide(GOOD, "code", fmt="text") is None  # code rules skip prose
    assert decide("x = '" + "a" * 1200 + "'\n", "code", fmt="code") == "code_max_line_length"
    assert decide("y = 1\n" + ("z" * 150 + "\n") * 5, "code", fmt="code") == "code_mean_line_length"
    assert decide("# {}\n" + "[] = {} ;;\n" * 20, "code", fmt="code") == "code_alnum_frac"
    assert decide("# Code generated by protoc. DO NOT EDIT.\n" + source, "code", fmt="code") == "code_autogenerated"


def _good_signals() -> dict:
    return compute_signals(pa.array([GOOD]), FilterConfig().families())


@pytest.mark.parametrize(
    ("family", "rule"),
    [(f, r) for f, r in RULES if r.op != "flag" and f not in ("language", "decontamination", "safety")],
    ids=lambda x: x if isinstance(x, str) else f"{x.code}-{x.op}",
)
def test_selection_boundaries(family, rule):
    """A value equal to its limit is kept; just beyond it is dropped under the rule's own code."""
    cfg = FilterConfig()
    fmt = "code" if family == "code" else "html"  # the published thresholds: the web profile
    limit = getattr(getattr(cfg, family), rule.limit)
    cols = {k: (v if isinstance(v, pa.Array) else pa.array(v)) for k, v in _good_signals().items()}
    if family == "code":
        cols.update(code_max_line_length=pa.array([80]), code_mean_line_length=pa.array([30.0]),
                    code_alnum_frac=pa.array([0.6]), code_autogenerated=pa.array([False]))
    typ = cols[rule.column].type
    at = pa.table({**cols, rule.column: pa.array([limit], typ)})
    assert select(at, [fmt], cfg)[0][0] is None
    step = 1 if pa.types.is_integer(typ) else 1e-6
    beyond = limit - step if rule.op == "min" else limit + step
    past = pa.table({**cols, rule.column: pa.array([beyond], typ)})
    reason, detail = select(past, [fmt], cfg)
    assert reason[0] == rule.code
    assert rule.column in detail[0]
