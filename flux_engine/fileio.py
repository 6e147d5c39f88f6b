"""Atomic file writes: a crash never leaves a partial file under the final name.

``atomic_write`` writes into a temporary sibling ``.{name}.XXXXXXXX.tmp``, fsyncs it, renames it into place and
fsyncs the folder, so the rename itself survives a power cut. A process killed mid-write (SIGKILL: no cleanup runs)
leaves its temporary file behind; ``remove_stale_temps`` removes those at the next start.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from typing import IO, Callable, List, Union

# ``atomic_write``'s temporary names: mkstemp's 8 random characters between our prefix and suffix.
_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: Union[str, os.PathLike], write: Callable[[IO], None], binary: bool = False) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, flushes it to disk (fsync), renames it into
    place and fsyncs the folder; on any error the temporary file is removed and the old ``path``, if any, is left
    as it was."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder: Union[str, os.PathLike]) -> None:
    """Flush a folder's entries (renames, removals) to disk. Filesystems that cannot fsync a folder (EINVAL,
    ENOTSUP: some network and FUSE filesystems) offer no more durability than what was done already."""
    fd = os.open(os.fspath(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temps(folder: Union[str, os.PathLike]) -> List[str]:
    """Remove the temporary files ``atomic_write`` left in ``folder`` when its process was killed mid-write; call
    it at start-up, before anything writes there. Returns the names removed (nothing when the folder is absent)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if _TEMP.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))
    for name in stale:
        os.unlink(os.path.join(folder, name))
    if stale:
        fsync_dir(folder)
    return stale
