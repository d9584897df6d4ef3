"""Secrets as a rule family: private keys, cloud and API keys, tokens and passwords in config-like lines.

A document holding a live credential is a leak to clean up, not training data, so by default it is dropped
(`secret_detected`); with `drop: false` it is kept and the filter's redaction step (`pii.secrets`) replaces
each secret with a placeholder instead (the default for generic `password = ...` values, see `SecretRules`).
It judges every format: credentials sit in code and config files
more than anywhere else. Detection is precise regexes per issuer (the key's documented shape), plus a
Shannon-entropy test for generic `password = ...` values; placeholders (`AKIAXXXXXXXXXXXXXXXX`, `EXAMPLE`,
`changeme`, `<your-token>`, `${VAR}`) are not secrets. No network, no key verification.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.tasks.quality.base import Batch, Rule, RuleFamily

# -- detectors -------------------------------------------------------------------------------------------

PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----"
    r"(?P<body>[\s\S]*?)(?:-----END \1PRIVATE KEY(?: BLOCK)?-----|\Z)"
)
KEY_BODY = re.compile(r"[A-Za-z0-9+/=]{40,}")  # a real block has base64 lines; a format description has none
AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}(?![A-Za-z0-9])")
AWS_SECRET = re.compile(
    r"(?i:aws.{0,20}?(?:secret|private).{0,20}?key)[\"']?\s*(?:[:=]|:=|=>)\s*[\"']?"
    r"(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)
GITHUB = re.compile(
    r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,})(?![A-Za-z0-9_])"
)
SLACK = re.compile(
    r"(?<![A-Za-z0-9])xox[abposr]-[0-9]{8,13}-[0-9A-Za-z-]{8,}(?![A-Za-z0-9-])"
    r"|https://hooks\.slack\.com/services/T[A-Z0-9]{8,}/B[A-Z0-9]{8,}/[A-Za-z0-9]{20,}"
)
GOOGLE = re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])")
STRIPE = re.compile(r"(?<![A-Za-z0-9_])(?:sk|rk)_live_[0-9A-Za-z]{24,99}(?![A-Za-z0-9_])")
JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}(?![A-Za-z0-9_-])"
)
_SECRET_NAME = (
    r"(?:pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|auth[_-]?key"
    r"|private[_-]?key|client[_-]?secret|credentials?)"
)
GENERIC = re.compile(
    r"(?<![A-Za-z0-9_.-])(?i:(?P<name>[A-Za-z0-9_.-]{0,40}" + _SECRET_NAME + r"[A-Za-z0-9_.-]{0,40}))"
    r"[\"']?[ \t]*(?::=|=>|[:=])[ \t]*"
    r"(?P<q>[\"'`]?)(?P<v>[^\s\"'`,;]{8,200})(?P=q)"
)
# Cheap tests that must pass before a pattern is run: most text holds none of these, and the GENERIC
# pattern (a name of up to 40 characters around a secret word) is costly to try at every position.
GENERIC_HINT = re.compile(r"(?i)" + _SECRET_NAME + r"[A-Za-z0-9_.-]{0,40}[\"']?[ \t]*(?::=|=>|[:=])")
AWS_KEY_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA", "A3T")
# What a text must contain for `find_secrets` to find anything: the literal each pattern needs (or the gate
# `find_secrets` puts before it), as one RE2 pattern that Arrow runs over a whole batch, so that only the few
# texts that match are searched in Python. It must stay a superset of the detectors: Python's IGNORECASE
# also folds `i` with `ı` and `İ`, which RE2 does not, so those are spelt out in the generic name.
SECRET_HINTS = "|".join([
    r"PRIVATE KEY",
    *AWS_KEY_PREFIXES,
    r"(?i:aws)",
    r"gh[pousr]_|github_pat_",
    r"xox|hooks\.slack\.com",
    r"AIza",
    r"_live_",
    r"eyJ",
    r"(?i:" + _SECRET_NAME.replace("i", "[iıİ]") + r"[A-Za-z0-9_.\-ıİ]{0,40}[\"']?[ \t]*(?::=|=>|[:=]))",
    r"://",
])  # fmt: skip


def may_hold_secrets(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """False for each text in which `find_secrets` can find nothing (one Arrow scan of the batch)."""
    hit = pc.match_substring_regex(texts, SECRET_HINTS).fill_null(False)
    return np.asarray(hit.to_numpy(zero_copy_only=False), bool)
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{1,64}:(?P<v>[^\s:/@]{6,128})@[A-Za-z0-9.-]+")
PLACEHOLDER = re.compile(
    r"(?i)example|sample|dummy|placeholder|changeme|change_me|redacted|your[_-]|my[_-]?(?:pass|secret|token)"
    r"|xxxx|\*\*\*|\.\.\.|<|>|\$\{|\{\{|%\(|\benv\b|getenv|environ|\bnull\b|\bnone\b"
)
# A name, not a value: `self.token`, `get_password_from_vault`, `SECRET_KEY`, `apiKeyFromEnv`.
# So are lower-case words joined by `-`/`_` (`quoted-string`) and settings named like a type or a count.
NAME = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+|[a-z0-9]*_[a-z0-9_]*|[A-Z0-9]*_[A-Z0-9_]*"
    r"|[a-z]+(?:[A-Z][a-z]+)+\d?|[a-z]+(?:[-_][a-z0-9]+)+"
)
NOT_A_SECRET_NAME = re.compile(
    r"(?i)(?:type|kind|name|names|id|path|file|dir|url|uri|len|length|count|size|limit|max|min|field|header"
    r"|prefix|format|hash|policy|expiry|expires|ttl|env|var)s?\Z"
)

SECRET_KINDS = (
    "private_key", "aws_access_key", "aws_secret_key", "github_token", "slack_token", "google_api_key",
    "stripe_key", "jwt", "generic_secret",
)


def shannon_entropy(s: str) -> float:
    """Bits per character; random keys score ~4.5-6, words and placeholders well under 3.5."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _placeholder(value: str) -> bool:
    """Documentation values: EXAMPLE keys, XXXX runs, `<your-token>`, `${VAR}`, few distinct characters."""
    return bool(PLACEHOLDER.search(value)) or len(set(value)) < max(6, len(value) // 4)


def _generic_value(value: str) -> bool:
    """A value worth calling a secret: not a name, number, path or placeholder, and random-looking enough."""
    if value.isdigit() or NAME.fullmatch(value) or value.lower() in ("true", "false"):
        return False
    if value[0] in "/.~" or "://" in value or any(c in value for c in "()[]{}"):
        return False
    if _placeholder(value):
        return False
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return classes >= 2 and shannon_entropy(value) >= 3.0


def _jwt_header(token: str) -> bool:
    head = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)


Span = tuple[str, int, int]  # kind, start, end (the characters to redact)


def _spans(pattern: re.Pattern[str], kind: str, text: str, group: str | int = 0,
           ok: Callable[[str], bool] | None = None) -> Iterator[Span]:
    for m in pattern.finditer(text):
        if ok is None or ok(m.group(group)):
            yield kind, m.start(group), m.end(group)


def find_secrets(text: str) -> list[Span]:
    """Every secret in `text` as (kind, start, end), without overlaps, in text order.

    Each pattern runs only where a literal it needs is present (`in` is far cheaper than a regex scan).
    """
    found: list[Span] = []
    if "PRIVATE KEY" in text:
        found += _spans(PRIVATE_KEY, "private_key", text, ok=lambda s: bool(KEY_BODY.search(s)))
    if any(p in text for p in AWS_KEY_PREFIXES):
        found += _spans(AWS_KEY_ID, "aws_access_key", text, ok=lambda s: not _placeholder(s[4:]))
    lower = text.lower()
    if "aws" in lower:
        found += _spans(AWS_SECRET, "aws_secret_key", text, "v", ok=lambda s: not _placeholder(s)
                        and shannon_entropy(s) >= 3.5)
    if "gh" in text or "github_pat_" in text:
        found += _spans(GITHUB, "github_token", text, ok=lambda s: not _placeholder(s.split("_", 1)[1]))
    if "xox" in text or "hooks.slack.com" in text:
        found += _spans(SLACK, "slack_token", text, ok=lambda s: not _placeholder(s))
    if "AIza" in text:
        found += _spans(GOOGLE, "google_api_key", text, ok=lambda s: not _placeholder(s))
    if "_live_" in text:
        found += _spans(STRIPE, "stripe_key", text, ok=lambda s: not _placeholder(s[8:]))
    if "eyJ" in text:
        found += _spans(JWT, "jwt", text, ok=_jwt_header)
    if GENERIC_HINT.search(text):
        found += (("generic_secret", m.start("v"), m.end("v")) for m in GENERIC.finditer(text)
                  if not NOT_A_SECRET_NAME.search(m.group("name")) and _generic_value(m.group("v")))
    if "://" in text and "@" in text:
        found += _spans(URL_PASSWORD, "generic_secret", text, "v", ok=lambda s: not _placeholder(s))
    out: list[Span] = []
    for span in sorted(found, key=lambda s: (s[1], -s[2])):  # first and longest wins an overlap
        if not out or span[1] >= out[-1][2]:
            out.append(span)
    return out


def redact_secrets(text: str, placeholder: str = "<SECRET>") -> tuple[str, int]:
    """`text` with every secret replaced by `placeholder`, and how many were."""
    spans = find_secrets(text)
    for _, start, end in reversed(spans):
        text = text[:start] + placeholder + text[end:]
    return text, len(spans)


# -- the family ------------------------------------------------------------------------------------------


class SecretRules(RuleFamily):
    """Drop documents holding a credential of a known shape; generic `password = ...` values are redacted.

    Issuer-shaped keys (private key blocks, AWS, GitHub, Slack, Google, Stripe, JWTs) are unambiguous, so a
    document holding one is dropped (`drop`). A generic secret-named assignment is right far less often in
    the wild (documentation shows example passwords such as `passwd='geheim$parole'`), so by default it only
    gets the value replaced by `pii.secrets` (`drop_generic: true` drops those documents too).
    """

    name = "secrets"
    applies_to = "all"
    rules = (
        Rule("secret_detected", "secrets_found", "flag", "drop", "secrets_kind"),
        Rule("secret_detected", "secrets_generic", "flag", "drop_generic", "secrets_kind"),
    )

    drop: bool = Field(True, description="drop a document holding an issuer-shaped key; false: redact it")
    drop_generic: bool = Field(False, description="also drop one with only generic `password = ...` values")

    def signals(self, batch: Batch) -> dict[str, Any]:
        n = len(batch)
        issuer = np.zeros(n, np.int32)
        generic = np.zeros(n, np.int32)
        kinds = [""] * n
        candidates = np.flatnonzero(may_hold_secrets(batch.arr)).tolist()
        texts = batch.texts if candidates else []
        for i in candidates:  # only the few texts holding a pattern's literal are searched in Python
            found = find_secrets(texts[i])
            generic[i] = sum(k == "generic_secret" for k, _, _ in found)
            issuer[i] = len(found) - generic[i]
            kinds[i] = ",".join(sorted({k for k, _, _ in found}))
        kind = pa.array(kinds, pa.string())
        return {"secrets_found": issuer, "secrets_generic": generic, "secrets_kind": kind}
