"""E-mail (.eml) through unstructured: MIME parts, HTML bodies and headers are its strength."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from refinery.tasks.ingest.base import Context, Format, Item, ReadError, text_doc


def read_email(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    from refinery.tasks.ingest.offline_nlp import use_offline_nlp

    use_offline_nlp()
    from unstructured.partition.email import partition_email

    try:
        elements = partition_email(file=io.BytesIO(data), process_attachments=False)
    except Exception as exc:  # noqa: BLE001 (the email package raises many types)
        raise ReadError("corrupt", f"unreadable e-mail: {type(exc).__name__}: {exc}") from exc
    texts = [e.text for e in elements if getattr(e, "text", "").strip()]
    meta: dict[str, Any] = {"reader": "unstructured"}
    if elements:
        md = elements[0].metadata
        for key, attr in (("subject", "subject"), ("from", "sent_from"), ("date", "last_modified")):
            value = getattr(md, attr, None)
            if value:
                meta[key] = value if isinstance(value, str) else ", ".join(map(str, value))
    yield text_doc("\n\n".join(texts), "text", len(data), meta, "e-mail")


EMAIL = Format("email", read_email, extensions={".eml"})
