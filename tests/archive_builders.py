"""Zip and tar archives built in memory, for the archive tests."""

from __future__ import annotations

import io
import tarfile
import zipfile


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A deflated zip holding `members` (name -> bytes), in order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], compression: str = "") -> bytes:
    """A tar holding `members`, compressed as `tarfile` names it ("" plain, "gz", "bz2", "xz")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()
