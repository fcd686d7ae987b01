"""How errors are told to the user: the exit codes of the ``volssl`` command, one-line messages for
user errors (a path, a permission, a format, a resource), the description of a caught exception
where a run reports a failure and goes on, and checks of input/output paths made before any work.

Exit codes (also in the docstring of :mod:`volssl.cli`):

====  =====================================================================================
0     success
1     internal error: a bug in volssl (the traceback is printed, with a line asking to report it)
2     usage or input error: a bad argument value, a missing / unreadable-format / wrong-kind input
      or output path, a symbolic link loop, a schema error in a JSON/config file
3     partial failure: the command ran but some cases failed or were skipped (``--strict`` of
      predict, evaluate-instances; always for evaluate when a pair could not be scored, agglomerate)
4     I/O or permission error while working: permission denied, read-only file system, disk full,
      input/output error
5     out of memory or another exhausted resource (MemoryError, CUDA out of memory, too many open files)
130   interrupted (Ctrl-C)
141   standard output closed early (``volssl ... | head``); nothing is printed
====  =====================================================================================
"""
from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_IO = 4
EXIT_RESOURCES = 5
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

# errno -> what it means, in words (the path follows after ": ")
_ERRNO_WORDS = {
    errno.ENOENT: "not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "already exists",
    errno.ELOOP: "symbolic link loop (a link that leads back to itself)",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error (failing disk or network file system?)",
    errno.ENOTEMPTY: "folder not empty",
    errno.EXDEV: "cannot move across file systems",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.ENOMEM: "out of memory",
    errno.EBUSY: "device or resource busy",
    errno.ETXTBSY: "file busy",
    errno.EINVAL: "invalid argument",
}
# OSErrors that say the path given is wrong (exit 2), and those that say a resource ran out (exit 5)
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.ENAMETOOLONG}
_RESOURCE_ERRNOS = {errno.ENOMEM, errno.EMFILE, errno.ENFILE}


def describe_error(e: BaseException) -> str:
    """``"<Type>: <message> at <file>:<line>"`` (the innermost frame of the traceback, if any)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def os_error_message(e: OSError) -> str:
    """An OSError in words, naming its path: ``"permission denied: /x/y"``; with two paths (a rename)
    ``"...: /a -> /b"``. An OSError raised with a sentence of its own (no errno) is that sentence."""
    if e.errno is None or not isinstance(e.errno, int):
        return _one_line(str(e)) or type(e).__name__
    words = _ERRNO_WORDS.get(e.errno) or (e.strerror or os.strerror(e.errno)).lower()
    if e.filename is None:
        # a sentence in strerror (OSError(errno.ELOOP, "input x is a link loop")) says it all
        return _one_line(e.strerror) if e.strerror and e.strerror != os.strerror(e.errno) else words
    where = os.fsdecode(e.filename) if isinstance(e.filename, (bytes, str, os.PathLike)) else str(e.filename)
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2) if isinstance(e.filename2, (bytes, str)) else e.filename2}"
    return f"{words}: {where}"


def _is_cuda_oom(e: BaseException) -> bool:
    return any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)


def _is_volume_error(e: BaseException) -> bool:
    return any(c.__name__ == "VolumeError" for c in type(e).__mro__)


def symlink_loop_path(e: BaseException) -> str | None:
    """The path of pathlib's ``RuntimeError("Symlink loop from '<path>'")`` (``Path.resolve`` on a link
    loop, Python < 3.13, where later versions raise OSError ELOOP), else None."""
    if type(e) is not RuntimeError:
        return None
    text = str(e)
    prefix = "Symlink loop from "
    if not text.startswith(prefix):
        return None
    return text[len(prefix):].strip().strip("'\"")


def exit_code(e: BaseException) -> int | None:
    """The exit code of a user error (module docstring), or None when ``e`` is not one (a bug)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if symlink_loop_path(e) is not None:
        return EXIT_USAGE
    if isinstance(e, MemoryError) or _is_cuda_oom(e):
        return EXIT_RESOURCES
    if isinstance(e, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    if isinstance(e, OSError):
        if e.errno in _RESOURCE_ERRNOS:
            return EXIT_RESOURCES
        if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)) \
                or e.errno in _PATH_ERRNOS:
            return EXIT_USAGE
        return EXIT_IO
    if isinstance(e, (ValueError, KeyError)) or _is_volume_error(e):  # json.JSONDecodeError is a ValueError
        return EXIT_USAGE
    return None


def user_message(e: BaseException) -> str:
    """One line saying what is wrong, for a user error (:func:`exit_code` not None)."""
    import json

    if isinstance(e, MemoryError) or _is_cuda_oom(e):
        detail = _one_line(str(e))
        kind = "out of GPU memory" if _is_cuda_oom(e) else "out of memory"
        if _is_cuda_oom(e):
            detail = detail.split(". ")[0]  # torch's message goes on with allocator advice
        return f"{kind}: {detail}" if detail else f"{kind} (use smaller inputs or a machine with more memory)"
    if isinstance(e, OSError):
        return os_error_message(e)
    loop = symlink_loop_path(e)
    if loop is not None:
        return f"{_ERRNO_WORDS[errno.ELOOP]}: {loop}"
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"not a text file: the bytes are not valid {e.encoding} (a binary file where text was expected?)"
    if isinstance(e, KeyError):
        key = e.args[0] if e.args else ""
        if isinstance(key, str) and " " in key.strip():  # raised with a sentence
            return _one_line(key)
        return f"missing entry {key!r}"
    return _one_line(str(e)) or type(e).__name__


def describe_failure(e: BaseException) -> str:
    """Why one file / case failed, where a run reports it and goes on: a user error in words
    (:func:`user_message`); anything else (a bug) as :func:`describe_error` (type, message, frame)."""
    if exit_code(e) is not None and not isinstance(e, KeyboardInterrupt):
        return user_message(e)
    return describe_error(e)


def _one_line(text: str | None) -> str:
    return " ".join(line.strip() for line in str(text or "").splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------- path checks


def file_kind(mode: int) -> str:
    """What an ``st_mode`` is, in words: "a named pipe (FIFO)", "a socket", "a folder", ..."""
    import stat

    for test, words in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "not a regular file"


def check_input_path(path: str | os.PathLike, what: str = "input", kind: str = "any") -> Path:
    """Make sure ``path`` exists, is readable and is a file (``kind="file"``), a folder (``"dir"``) or
    either (``"any"``); raise a user error naming ``what`` and the path otherwise (a missing path,
    a link to a missing target, a symbolic link loop, a named pipe, socket or device, the wrong kind,
    no read permission)."""
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{what} {p} is a symbolic link loop (a link that leads back to itself)") \
                from None
        if e.errno == errno.ENOENT and os.path.islink(p):
            raise FileNotFoundError(f"{what} {p} is a link to a missing target ({os.readlink(p)})") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(f"{what} not found: {p}") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(f"{what} {p}: permission denied") from None
        raise
    import stat

    is_dir = stat.S_ISDIR(st.st_mode)
    if not (is_dir or stat.S_ISREG(st.st_mode)):
        raise ValueError(f"{what} {p} is {file_kind(st.st_mode)}, not a file or folder; not opened (reading it "
                         "could block forever)")
    if kind == "file" and is_dir:
        raise IsADirectoryError(f"{what} {p} is a folder; give a file")
    if kind == "dir" and not is_dir:
        raise NotADirectoryError(f"{what} {p} is a file; give a folder")
    if not os.access(p, os.R_OK | (os.X_OK if is_dir else 0)):
        raise PermissionError(f"{what} {p}: permission denied (cannot read it)")
    return p


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Make sure a file can be written at ``path`` before the work that produces it starts: the path
    is not a folder (or a link loop), and its folder is creatable and writable
    (:func:`volssl.util.paths.check_output_dir`, which creates it). Raises ValueError naming the path."""
    from volssl.util.paths import check_output_dir

    p = Path(path).expanduser()
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{what} {p} is a symbolic link loop (a link that leads back to itself)") from None
    if p.is_dir():
        raise ValueError(f"{what} {p} is an existing folder; give a file path")
    if p.name in ("", ".", ".."):
        raise ValueError(f"{what} {p} is not a file name")
    check_output_dir(p.parent if str(p.parent) else Path("."), f"folder of the {what}")
    return p
