"""Writing output files so that a reader never sees a half-written one.

:func:`atomic_output` is the one way files are written here: to a temporary file in the same
folder, then ``os.replace``. The label writers build on it: MONAI's ``NibabelWriter`` and
``ITKWriter`` with an atomic write, and for ``.nii.gz`` a gzip level of the caller's choice (1 by
default: fast, labels compress well at any level). NRRD and MetaImage labels are written
uncompressed by default, as 3D Slicer asks for them.
"""

from __future__ import annotations

import gzip
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from monai.data import ITKWriter, NibabelWriter

__all__ = ["AtomicITKWriter", "AtomicNibabelWriter", "atomic_output", "write_label", "writer_for"]


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write to; on success it replaces ``path``.

    ``os.replace`` is atomic within one file system, so readers see the old file or the complete new
    one. On an error the temporary file is removed and ``path`` is left as it was. The temporary
    name keeps the file's extensions (writers choose the format by them) and is unique per process
    and thread.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter``, written atomically; ``.nii.gz`` at gzip level ``compresslevel``."""

    def write(self, filename, verbose: bool = False, compresslevel: int = 1, **obj_kwargs):
        name = str(filename)
        with atomic_output(name) as tmp:
            if not name.endswith(".gz"):
                return super().write(str(tmp), verbose=verbose, **obj_kwargs)
            # nibabel's own gzip level is a class-wide setting: serialise, then compress at ours
            plain = tmp.with_name(tmp.name[: -len(".gz")])
            try:
                super().write(str(plain), verbose=verbose, **obj_kwargs)
                with open(plain, "rb") as src, open(tmp, "wb") as dst:
                    dst.write(gzip.compress(src.read(), compresslevel=int(compresslevel), mtime=0))
            finally:
                plain.unlink(missing_ok=True)


class AtomicITKWriter(ITKWriter):
    """MONAI's ``ITKWriter`` (NRRD, MetaImage, ...), written atomically, uncompressed by default."""

    def write(self, filename, verbose: bool = False, compresslevel: int = 0, **kwargs):
        kwargs.setdefault("compression", int(compresslevel) > 0)
        with atomic_output(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **kwargs)


def writer_for(path: str):
    """The atomic writer class for ``path``'s format: NIfTI through nibabel, the rest through ITK."""
    return AtomicNibabelWriter if str(path).lower().endswith((".nii", ".nii.gz")) else AtomicITKWriter


def write_label(label, path: str, affine=None, compresslevel: int | None = None, dtype="uint8") -> str:
    """Write a label map ``(1, *spatial)`` or ``(*spatial)`` (MetaTensor, tensor or array) to ``path``, atomically.

    The affine is the label's own (MetaTensor) unless given. ``compresslevel``: the gzip level of
    ``.nii.gz`` (default 1); for other formats ``> 0`` turns on ITK's compression (default off).
    """
    writer = writer_for(path)(output_dtype=np.dtype(dtype))
    writer.set_data_array(label, channel_dim=0 if getattr(label, "ndim", 0) == 4 else None)
    writer.set_metadata({"affine": affine if affine is not None else getattr(label, "affine", None)}, resample=False)
    if compresslevel is None:
        compresslevel = 1 if str(path).lower().endswith(".gz") else 0
    writer.write(path, compresslevel=int(compresslevel))
    return path
