"""Files replaced whole: written beside their target under a temporary name, flushed to disk, then renamed
over it (``os.replace``, atomic on one file system). A reader, a crash or a full disk never leaves half a
file where the old one was: the target is either the old file or the new one, and a write that fails
leaves no temporary file behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace ``path`` with the file that ``write(tmp)`` writes at ``tmp`` (same folder, hidden name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # created by ``write``: the usual mode
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before it takes the old file's place
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
