"""PII redaction: e-mail addresses, public IP addresses and phone numbers become placeholders.

Private, loopback and reserved IP addresses (127.0.0.1, 10.x, 192.168.x, ...)
identify no one and are common in documentation and code, so they are kept.
"""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]\d)")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])"
)


class PIIRules(BaseModel):
    """Which kinds of PII are replaced in kept documents, and by what."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    email: bool = True
    ip: bool = True
    phone: bool = True
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"


def _public_ip(match: re.Match[str]) -> bool:
    try:
        return ipaddress.ip_address(match.group(0)).is_global
    except ValueError:
        return False


def redact(text: str, rules: PIIRules) -> tuple[str, dict[str, int]]:
    """`text` with PII replaced, and how many of each kind were replaced."""
    counts = {"email": 0, "ip": 0, "phone": 0}
    if not rules.enabled:
        return text, counts
    if rules.email and "@" in text:
        text, counts["email"] = EMAIL.subn(rules.email_placeholder, text)
    if rules.ip:
        def ip_sub(m: re.Match[str]) -> str:
            if _public_ip(m):
                counts["ip"] += 1
                return rules.ip_placeholder
            return m.group(0)

        text = IPV4.sub(ip_sub, text)
    if rules.phone:
        text, counts["phone"] = PHONE.subn(rules.phone_placeholder, text)
    return text, counts
