"""PII redaction: e-mail addresses, public IP addresses (v4 and v6), phone numbers, payment card numbers,
IBANs and secrets become placeholders in kept documents.

Each detector is precise rather than greedy, because a false positive rewrites training text:
- IPv4 needs valid octets, and is left alone in a version context (`v1.2.3.4`, `version 10.0.0.1`,
  `==2.0.1.3`) and when all four octets are different single digits (`1.2.3.4`: a version or a
  documentation example far more often than a host). Private, loopback and reserved addresses (127.0.0.1,
  10.x, 192.168.x, 2001:db8::) identify no one and are kept.
- Phone numbers need a phone's shape: a leading `+` and country code, an area code in brackets, `-` or `.`
  separators in a 3-3-4 grouping, a trunk `0` prefix, or a word like "call"/"phone" just before plain
  spaced groups; `1024 2048 4096` is a run of numbers, not a phone.
- Card numbers must pass the Luhn check and start with an issuer's prefix; IBANs must have their country's
  length and pass the mod-97 check.
Code documents (the filter's `code_formats`) keep their PII by default (`pii.code: false`): version strings,
constants and test fixtures there are not personal data, and rewriting code breaks it. Secrets
(`refinery.tasks.quality.secrets`) are redacted in every format.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from refinery.tasks.quality.secrets import redact_secrets

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.-])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w-]|\.\d)")
VERSION_CONTEXT = re.compile(
    r"(?i)(?:(?<![a-z])(?:v|ver|versions?|release|rel|rev|build|update|patch)|==|>=|<=|~=|!=|\^|~)"
    r"[\s:=\"'(_]{0,6}\Z"
)
IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\d)"
)
PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,8}){1,4}"  # +44 (20) 7946 0958
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"  # (415) 555-0132
    r"|\d{3}-\d{3}-\d{4}|\d{3}\.\d{3}\.\d{4}"  # 415-555-0132, 415.555.0132
    r"|0\d{1,4}[ -]\d{3,4}[ -]\d{3,4}"  # 020 7946 0958, 030-1234-5678 (trunk prefix)
    r"|(?P<spaced>\d{3} \d{3} \d{4}|\d{3}-\d{4})"  # only after a phone word, see _phone
    r")(?![\w-]|\.\d)"
)
PHONE_WORD = re.compile(
    r"(?i)\b(?:phone|tel|telephone|call|fax|mobile|cell|ring|text|whatsapp|sms|dial)\b\W{0,6}\Z"
)
CARD = re.compile(
    r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?![\w-])"
)
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20,
    "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
    "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26, "AE": 23, "SA": 24, "IL": 23, "BR": 29,
}
CARD_PREFIX = re.compile(r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3[0689]|6(?:011|5|4[4-9]|2)|35")

KINDS = ("email", "ip", "phone", "card", "iban", "secret")


class PIIRules(BaseModel):
    """Which kinds of PII are replaced in kept documents, and by what."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    email: bool = True
    ip: bool = True  # IPv4 and IPv6
    phone: bool = True
    card: bool = True
    iban: bool = True
    secrets: bool = True  # secrets left in kept documents (`secrets.drop: false`), in every format
    code: bool = False  # also redact PII (not only secrets) in code documents
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"
    card_placeholder: str = "<CARD_NUMBER>"
    iban_placeholder: str = "<IBAN>"
    secret_placeholder: str = "<SECRET>"


# -- validators: each takes a match and says whether it is really PII ----------------------------------------


def ipv4_ok(m: re.Match[str]) -> bool:
    """A public IPv4 address that is not a version string."""
    text, s = m.string, m.group(0)
    if VERSION_CONTEXT.search(text, max(0, m.start() - 24), m.start()):
        return False
    octets = s.split(".")
    if all(len(o) == 1 for o in octets) and len(set(octets)) == 4:
        return False
    return ipaddress.ip_address(s).is_global


def ipv6_ok(m: re.Match[str]) -> bool:
    """A valid, global IPv6 address with at least three groups written out (not `a::b` in a slice)."""
    s = m.group(0)
    if sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


GROUP_BEFORE = re.compile(r"(?<![A-Za-z0-9])(?=[A-Z]*\d)[A-Z0-9]{1,4}[ -]\Z")
GROUP_AFTER = re.compile(r"[ -]\d{1,4}(?![A-Za-z0-9])")


def phone_ok(m: re.Match[str]) -> bool:
    """A phone-shaped number with 7 to 15 digits, not a slice of a longer run of groups (a card, an IBAN);
    plain spaced groups only after a word like "call"."""
    digits = sum(c.isdigit() for c in m.group(0))
    if not 7 <= digits <= 15:
        return False
    text = m.string
    if GROUP_BEFORE.search(text, max(0, m.start() - 5), m.start()) or GROUP_AFTER.match(text, m.end()):
        return False
    if m.group("spaced"):
        return bool(PHONE_WORD.search(m.string, max(0, m.start() - 24), m.start()))
    return True


def luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def card_ok(m: re.Match[str]) -> bool:
    """13-19 digits from a card issuer's range that pass the Luhn check."""
    digits = re.sub(r"\D", "", m.group(0))
    return 13 <= len(digits) <= 19 and bool(CARD_PREFIX.match(digits)) and luhn(digits)


def iban_valid(iban: str) -> bool:
    """Country length and the ISO 13616 mod-97 check."""
    s = iban.replace(" ", "")
    if IBAN_LENGTHS.get(s[:2], 0) != len(s) and not (s[:2] not in IBAN_LENGTHS and 15 <= len(s) <= 34):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def iban_ok(m: re.Match[str]) -> bool:
    return iban_valid(m.group(0))


URL_USERINFO = re.compile(r"://[^\s/@]*\Z")


def email_ok(m: re.Match[str]) -> bool:
    """Not an image density suffix (`icon@2x.png`), nor the user or token in a URL (`https://tok@host`)."""
    return not re.search(r"@\d+x\.", m.group(0)) and not URL_USERINFO.search(m.string, 0, m.start())


DETECTORS: dict[str, tuple[re.Pattern[str], Callable[[re.Match[str]], bool]]] = {
    "email": (EMAIL, email_ok),
    "card": (CARD, card_ok),
    "iban": (IBAN, iban_ok),
    "ipv6": (IPV6, ipv6_ok),
    "ipv4": (IPV4, ipv4_ok),
    "phone": (PHONE, phone_ok),
}


def find(kind: str, text: str) -> list[str]:
    """The PII of one detector kind (`email`, `ipv4`, `ipv6`, `phone`, `card`, `iban`) found in `text`."""
    pattern, ok = DETECTORS[kind]
    return [m.group(0) for m in pattern.finditer(text) if ok(m)]


def _sub(text: str, kind: str, placeholder: str) -> tuple[str, int]:
    pattern, ok = DETECTORS[kind]
    n = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal n
        if ok(m):
            n += 1
            return placeholder
        return m.group(0)

    return pattern.sub(repl, text), n


def redact(text: str, rules: PIIRules, is_code: bool = False) -> tuple[str, dict[str, int]]:
    """`text` with PII (not in code, unless `rules.code`) and secrets replaced, and how many of each were.

    Secrets go first and cards/IBANs before phones and IPs, so a longer match is never cut into pieces.
    """
    counts = dict.fromkeys(KINDS, 0)
    if not rules.enabled:
        return text, counts
    if rules.secrets:
        text, counts["secret"] = redact_secrets(text, rules.secret_placeholder)
    if is_code and not rules.code:
        return text, counts
    if rules.email and "@" in text:
        text, counts["email"] = _sub(text, "email", rules.email_placeholder)
    if rules.card:
        text, counts["card"] = _sub(text, "card", rules.card_placeholder)
    if rules.iban:
        text, counts["iban"] = _sub(text, "iban", rules.iban_placeholder)
    if rules.ip:
        text, n6 = _sub(text, "ipv6", rules.ip_placeholder) if ":" in text else (text, 0)
        text, n4 = _sub(text, "ipv4", rules.ip_placeholder)
        counts["ip"] = n4 + n6
    if rules.phone:
        text, counts["phone"] = _sub(text, "phone", rules.phone_placeholder)
    return text, counts
