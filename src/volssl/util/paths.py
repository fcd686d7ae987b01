"""Checks on the paths a command is given, made before any work starts."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Make sure ``path`` can be a folder this process writes into; create it if it is missing.

    Raises ValueError naming the path when it is an existing file (or a dangling link), or when it, or
    the nearest existing folder above it, cannot be written (read-only folder or file system, no
    permission). The check writes and removes one empty temporary file, so it also catches a file system
    mounted read-only, which permission bits alone do not show. Returns the path, resolved.
    """
    path = Path(path).expanduser()
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{what} {path} is a symbolic link loop (a link that leads back to itself)") \
                    from None
        raise ValueError(f"{what} {path} is a link to a missing target ({os.readlink(path)})")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise ValueError(f"{what} {path}: a part of the path is an existing file") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be created: {_reason(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".volssl-write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path} is not writable: {_reason(e)}") from None
    return path.resolve()


def _reason(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)
