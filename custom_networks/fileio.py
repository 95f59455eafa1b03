"""Writing output files so that an error never leaves a half-written one behind."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output"]


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write to; on success it replaces ``path``.

    ``os.replace`` is atomic within one file system, so readers see the old file or the complete new
    one. On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
