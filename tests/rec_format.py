"""A made-up format, `.rec`, written the way a real one is: one module declaring one `Format`.

A `.rec` file starts with the line `%%rec`; records follow, each ended by a line `%%`
(the last one may end at the end of the file). Without the first line the file is not
a `.rec` file (`corrupt`); an empty record is quarantined as `no_text`. The format also
claims files with another extension whose content starts with `%%rec`.
"""

from __future__ import annotations

from collections.abc import Iterator

from refinery.tasks.ingest.base import Context, Doc, Format, Item, Problem, ReadError

MAGIC = b"%%rec"


def read_rec(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    lines = data.decode("utf-8").split("\n")  # not UTF-8: the stage quarantines it as `parse_error`
    if lines[0].strip() != MAGIC.decode():
        raise ReadError("corrupt", "not a .rec file: the first line is not '%%rec'")
    records: list[list[str]] = [[]]
    for line in lines[1:]:
        if line.strip() == "%%":
            records.append([])
        else:
            records[-1].append(line)
    if not "".join(records[-1]).strip():
        records.pop()  # nothing after the last separator
    for pos, record in enumerate(records):
        text = "\n".join(record).strip()
        if text:
            yield Doc(text, "rec", len(text.encode("utf-8")), {"record": pos}, pos)
        else:
            yield Problem("no_text", f"record {pos} is empty", pos)


REC = Format("rec", read_rec, extensions={".rec"}, sniff=lambda head: head.startswith(MAGIC))
