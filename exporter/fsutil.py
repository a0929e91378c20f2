"""The one atomic file write: results, caches and image manifests are either whole or absent.

Temp file in the same directory, fsync, rename over the target, fsync of the directory; so a crash
or a full disk at any moment leaves the previous version (or nothing), never half a file.

And the one bounded read of a file the daemon trusts less than its own code (``read_regular``):
only regular files, only up to a size limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably; raises ``OSError`` (the caller decides
    whether that is a metric, a log line or fatal)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


#: what ``read_regular`` reads at most unless told otherwise (configs, caches and state are KiB)
READ_LIMIT = 16 * 1024 * 1024


def read_regular(path: str | os.PathLike[str], limit: int = READ_LIMIT) -> bytes:
    """The bytes of a *regular* file of at most ``limit`` bytes; raises ``OSError`` otherwise.

    A FIFO as config, state or cache file would block ``open`` until a writer comes (the daemon
    hangs before binding, or a SIGHUP reload blocks the main thread so SIGTERM is never acted
    on), and ``/dev/zero`` never ends: so the file is opened non-blocking, checked with ``fstat``
    before a byte is read, and read only up to the limit."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(65536, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # grew while being read
                raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
