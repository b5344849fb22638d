"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

A write goes to `NAME.<pid>.<random>.tmp` beside the target, is fsynced and renamed over it. A full disk or
an unwritable directory is one StorageError naming the path, with the old file intact and no temp file
left; temp files that a crashed process left beside the target are removed by the next write (and those
of a whole run directory when a run starts). Files get
the permissions the umask gives (not mkstemp's 0600).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "x.txt")
>>> with atomic_write(path, "w") as f: _ = f.write("hello")
>>> open(path).read()
'hello'
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import tempfile

from fusegrad.core.errors import FormatError, StorageError


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting it back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path) -> list:
    """Remove the temp files of earlier writes of `path` (of every file in it, for a directory) whose process
    is gone; returns what was removed."""
    path = os.fspath(path)
    pattern = os.path.join(glob.escape(path), "*.tmp") if os.path.isdir(path) else glob.escape(path) + ".*.tmp"
    removed = []
    for tmp in glob.glob(pattern):
        parts = os.path.basename(tmp).rsplit(".", 3)  # NAME.<pid>.<random>.tmp
        if len(parts) == 4 and parts[1].isdigit() and not _alive(int(parts[1])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
                removed.append(tmp)
    return removed


def storage_error(path, exc: OSError) -> StorageError:
    """One line for a failed write: the path, the reason, and that the previous file is intact."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror or str(exc))
    return StorageError(exc.errno, f"{path}: cannot write ({reason}); the previous file, if any, is untouched")


def _rust_errno(exc: BaseException):
    """The errno in a message like "No space left on device (os error 28)" (how Rust libraries report it)."""
    match = re.search(r"\(os error (\d+)\)", str(exc)) if isinstance(exc, Exception) else None
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path` for the caller to write; then fsync it and rename it over `path`
    (and fsync the directory). On an exception the temp file is removed and `path` is untouched; an OSError
    of the file system becomes a StorageError."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        code = exc.errno if isinstance(exc, OSError) else _rust_errno(exc)  # safetensors' errors are Rust's
        if code is not None and not isinstance(exc, StorageError):
            raise storage_error(path, OSError(code, os.strerror(code))) from exc
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temp file beside `path` for writing; it replaces `path` atomically when the block ends."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def fsync_dir(directory) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json_object(path, what: str) -> dict:
    """A JSON file holding an object (a config, params, metadata); FormatError naming the file and `what` it is."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return value
