"""Write-then-rename: the one way this project replaces a file that someone may be reading.

A reader (another process, the aggregator after a power cut) sees the old file or the new one, never
half of either. Used for checkpoints, model artifacts, TensorRT engines, cached text vectors and the
broker's password and certificate files.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int | None = None, keep_owner: bool = False,
                  durable: bool = True) -> Iterator[BinaryIO]:
    """Open a binary handle whose content replaces ``path`` when the ``with`` block ends cleanly.

    Args:
        path: the file to create or replace; its folder is created when missing.
        mode: permission bits set before the first byte is written, so a secret is never readable
            by anyone the final file excludes (default: 0600, the temporary file's; pass 0o644 for
            a file other users read).
        keep_owner: give the new file the owner and group of the file it replaces (effective only
            as root), so a password file chown'ed to the broker's user stays readable by it.
        durable: fsync the file and its folder, so a power cut cannot bring back the old file (or
            none) after the caller was told it was written.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was; the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.stat() if keep_owner and path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            if old is not None:
                # Only root may give a file away; anyone else writes files it owns already.
                with contextlib.suppress(PermissionError):
                    os.fchown(handle.fileno(), old.st_uid, old.st_gid)
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_folder(path.parent)


def write_atomic(path: str | Path, data: bytes | str | memoryview, mode: int | None = None,
                 keep_owner: bool = False, durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` (bytes, text as UTF-8, or any buffer) via :func:`atomic_writer`."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_writer(path, mode=mode, keep_owner=keep_owner, durable=durable) as handle:
        handle.write(payload)
    return Path(path)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable: without it a power cut can undo the rename."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
