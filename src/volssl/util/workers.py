"""Process pools whose workers exit when the main process is gone (killed with ``kill -9``, out of
memory): preprocessing, benchmark cells, the demo's runs. Without it a killed command leaves its workers
running, and writing, for minutes."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

#: seconds between two looks of a worker at the main process
PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat; tells a reused pid apart), or
    None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
        return text[text.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``, see :func:`_process_start`) still runs: a
    zombie (killed, not yet reaped by its parent) or a new process under the same pid counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        fields = text[text.rindex(")") + 2:].split()
    except ValueError:
        return True
    if fields and fields[0] in ("Z", "X"):
        return False
    return start is None or len(fields) < 20 or fields[19] == start


def _watch_main(main_pid: int, start: str | None, poll_s: float) -> None:
    while _process_alive(main_pid, start):
        time.sleep(poll_s)
    os._exit(70)  # the main process is gone: nobody will collect this worker's result


def _worker_init(main_pid: int, start: str | None, poll_s: float = PARENT_POLL_S) -> None:
    """Initializer of every pool worker: exit as soon as the main process ``main_pid`` is gone.

    A worker's parent is the forkserver, which exits when the main process dies; on Linux the
    kernel then kills the worker (``prctl(PR_SET_PDEATHSIG, SIGKILL)``). A daemon thread also polls
    the main process every ``poll_s`` seconds (any OS, and a forkserver that outlives it).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            parent = os.getppid()
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(70)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_main, args=(main_pid, start, poll_s), name="volssl-watch-main",
                     daemon=True).start()


def watched_pool(workers: int, ctx) -> ProcessPoolExecutor:
    """A process pool whose workers exit when this process is gone (:func:`_worker_init`)."""
    me = os.getpid()
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(me, _process_start(me)))


def use_job_threads(job: dict) -> None:
    """Give torch ``job["threads"]`` CPU threads in a worker process or launcher job (absent, None or 0:
    leave torch's default)."""
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
